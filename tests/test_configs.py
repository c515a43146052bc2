"""Every experiment config builds, validates on this machine's devices, and reads its argument."""

import importlib.util
import pathlib

import pytest

from prmim_jax import config_args, finetune, train

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRETRAIN = [p for p in CONFIGS if p.stem.startswith("pretrain_")]
CLASSIFY = [p for p in CONFIGS if not p.stem.startswith("pretrain_")]


def test_every_config_is_a_pretraining_or_a_classifier_config():
    assert len(PRETRAIN) >= 2 and len(CLASSIFY) >= 4
    for path in CONFIGS:
        assert load(path).get_config().task == ("pretrain" if path in PRETRAIN else "finetune"), path


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "runlocal", "method=partial,sampler=random_throw,throw=0.25", "method=mae"])
def test_pretraining_configs_validate(path, arg):
    config = load(path).get_config(arg)
    config.batch_size = 8 * (config.batch_size // 8)  # the suite simulates 8 devices
    config.knn.batch_size = 8 * max(1, config.knn.batch_size // 8)
    setup = train.validate(config)
    assert setup.method.name == config_args.parse(arg).get("method", "prmim")
    assert config.data.image_size == config.model.image_size


@pytest.mark.parametrize("path", CLASSIFY, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_classifier_configs_validate(path, arg):
    config = load(path).get_config(arg)
    config.batch_size = 8 * (config.batch_size // 8)
    config.eval.batch_size = 8 * max(1, config.eval.batch_size // 8)
    setup = finetune.validate(config)
    assert config.data.image_size == config.model.image_size and setup.model.num_classes == config.model.num_classes


def test_finetune_in1k_is_the_papers_table_14():
    module = load(CONFIGS[[p.stem for p in CONFIGS].index("finetune_in1k")])
    for variant, (lr, decay, drop_path, epochs) in {
        "B/16": (5e-4, 0.65, 0.1, 100),
        "L/16": (1e-3, 0.75, 0.2, 50),
    }.items():
        config = module.get_config(f"model={variant}")
        assert config.batch_size == 1024 and config.total_steps == epochs * (1_281_167 // 1024)
        assert config.optimizer.base_lr * config.batch_size / 256 == pytest.approx(4 * lr)  # Table 14's lr row
        assert (config.optimizer.layer_decay, config.model.drop_path_rate) == (decay, drop_path)
        assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.weight_decay) == (0.9, 0.999, 0.05)
        assert config.optimizer.warmup_steps == 5 * (1_281_167 // 1024)
        assert config.data.rand_augment == "rand-m9-mstd0.5-inc1" and config.data.random_erase_prob == 0.25
        assert (config.mixing.mixup_alpha, config.mixing.cutmix_alpha, config.mixing.label_smoothing) == (0.8, 1.0, 0.1)
    assert module.get_config("blocks=4").model.trainable_blocks == 4


def test_in1k_config_is_the_papers_table_13():
    config = load(CONFIGS[[p.stem for p in CONFIGS].index("pretrain_in1k")]).get_config()
    assert config.batch_size == 4096 and config.total_steps == 100 * (1_281_167 // 4096)
    assert config.optimizer.base_lr == 1.5e-4 and config.optimizer.b2 == 0.95 and config.optimizer.weight_decay == 0.05
    assert config.optimizer.warmup_steps == 40 * (1_281_167 // 4096)
    assert config.method.mask_ratio == 0.75 and config.method.norm_pix_loss
    assert (config.model.variant, config.method.name, config.method.throw_ratio) == ("B/16", "prmim", 0.5)


def test_config_argument_parsing():
    assert config_args.parse("runlocal, method=mae,throw=0.25") == {"runlocal": True, "method": "mae", "throw": "0.25"}
    assert config_args.parse(None) == {}
