"""Every experiment config builds, validates on this machine's devices, and reads its argument."""

import importlib.util
import pathlib

import pytest

from prmim_jax import config_args, train

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "runlocal", "method=partial,sampler=random_throw,throw=0.25", "method=mae"])
def test_configs_validate(path, arg):
    config = load(path).get_config(arg)
    config.batch_size = 8 * (config.batch_size // 8)  # the suite simulates 8 devices
    config.knn.batch_size = 8 * max(1, config.knn.batch_size // 8)
    setup = train.validate(config)
    assert setup.method.name == config_args.parse(arg).get("method", "prmim")
    assert config.data.image_size == config.model.image_size


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
