"""Every experiment config builds, validates on this machine's devices, and reads its argument."""

import importlib.util
import pathlib

import pytest

from prmim_jax import config_args, methods, train

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRETRAIN = [p for p in CONFIGS if p.stem.startswith("pretrain_") and "simmim" not in p.stem]
SIMMIM = [p for p in CONFIGS if p.stem.startswith("pretrain_simmim")]
CLASSIFY = [p for p in CONFIGS if not p.stem.startswith("pretrain_")]


def test_every_config_names_the_method_it_runs():
    assert len(PRETRAIN) >= 2 and len(SIMMIM) >= 2 and len(CLASSIFY) >= 4
    for path in CONFIGS:
        name = load(path).get_config().method.name
        assert name == ("mae" if path in PRETRAIN else "simmim" if path in SIMMIM else "classify"), path


def validated(config):
    config.batch_size = 8 * (config.batch_size // 8)  # the suite simulates 8 devices
    config.evals.knn.batch_size = 8 * max(1, config.evals.knn.batch_size // 8)
    return train.validate(config)


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "runlocal", "method=partial,sampler=random_throw,throw=0.25", "method=mae"])
def test_pretraining_configs_validate(path, arg):
    config = load(path).get_config(arg)
    setup = validated(config)
    expected = methods.method_config(config_args.parse(arg).get("method", "prmim"))
    assert (setup.method.name, setup.method.throwing.reconstruction) == (expected.name, expected.reconstruction)
    assert config.data.image_size == config.model.image_size


@pytest.mark.parametrize("path", SIMMIM, ids=lambda p: p.stem)
@pytest.mark.parametrize(
    "arg, reconstruction, throw",
    [
        (None, "full", 0.0),
        ("runlocal", "full", 0.0),
        ("reconstruction=partial,sampler=random_throw,throw=0.25", "partial", 0.25),
        ("reconstruction=progressive", "progressive", 0.3),  # the paper's Table 4 rho_d
    ],
)
def test_simmim_configs_validate_with_one_key_for_pr_mim(path, arg, reconstruction, throw):
    setup = validated(load(path).get_config(arg))
    throwing = setup.method.throwing
    assert (throwing.reconstruction, throwing.layout.throw_ratio) == (reconstruction, throw)
    assert throwing.layout.mask_unit * setup.method.model.patch_size == setup.method.config.method.mask_patch_size


@pytest.mark.parametrize("path", CLASSIFY, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_classifier_configs_validate(path, arg):
    config = load(path).get_config(arg)
    config.batch_size = 8 * (config.batch_size // 8)
    config.evals.accuracy.batch_size = 8 * max(1, config.evals.accuracy.batch_size // 8)
    setup = train.validate(config)
    assert config.data.image_size == config.model.image_size
    assert setup.method.model.num_classes == config.model.num_classes


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
    assert (config.model.variant, config.method.reconstruction, config.method.throw_ratio) == (
        "B/16",
        "progressive",
        0.5,
    )


def test_config_argument_parsing():
    assert config_args.parse("runlocal, method=mae,throw=0.25") == {"runlocal": True, "method": "mae", "throw": "0.25"}
    assert config_args.parse(None) == {}
