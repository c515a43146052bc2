"""Every experiment config builds, validates on this machine's devices, and reads its argument."""

import importlib.util
import pathlib

import pytest

from prmim_jax import config_args, methods, train

CONFIGS = sorted(
    path
    for path in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py")
    if "def get_config(" in path.read_text()  # common.py holds the pieces they share
)


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def framework(path) -> str:
    """The method a config runs, from its name: ``pretrain_<framework>_<data>.py``; ``pretrain_<data>.py`` is MAE,
    and ``pretrain_amt_<data>.py`` AMT's sampler on MAE by default (``framework=simmim`` on SimMIM)."""
    parts = path.stem.split("_")
    name = "classify" if parts[0] != "pretrain" else parts[1] if len(parts) == 3 else "mae"
    return {"amt": "mae"}.get(name, name)


AMT = [p for p in CONFIGS if p.stem.startswith("pretrain_amt_")]
PRETRAIN = [p for p in CONFIGS if framework(p) == "mae" and p not in AMT]
SIMMIM = [p for p in CONFIGS if framework(p) == "simmim"]
LOCALMIM = [p for p in CONFIGS if framework(p) == "localmim"]
MFF = [p for p in CONFIGS if framework(p) == "mff"]
TEC = [p for p in CONFIGS if framework(p) == "tec"]
CLASSIFY = [p for p in CONFIGS if framework(p) == "classify"]


def test_every_config_names_the_method_it_runs():
    assert len(PRETRAIN) >= 2 and len(SIMMIM) >= 2 and len(LOCALMIM) >= 2 and len(CLASSIFY) >= 4
    for path in CONFIGS:
        assert load(path).get_config().method.name == framework(path), path


def validated(config):
    config.batch_size = 8 * (config.batch_size // 8)  # the suite simulates 8 devices
    config.evals.knn.batch_size = 8 * max(1, config.evals.knn.batch_size // 8)
    return train.validate(config)


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "runlocal", "method=partial,sampler=random_throw,throw=0.25", "method=mae"])
def test_pretraining_configs_validate(path, arg):
    config = load(path).get_config(arg)
    setup = validated(config)
    given = dict(item.partition("=")[::2] for item in (arg or "").split(",") if item)
    expected = methods.method_config(given.get("method", "prmim"))
    assert (setup.method.name, setup.method.throwing.reconstruction) == (expected.name, expected.reconstruction)
    assert config.data.image_size == config.model.image_size


@pytest.mark.parametrize("path", AMT, ids=lambda p: p.stem)
@pytest.mark.parametrize(
    "arg", [None, "runlocal", "framework=simmim", "framework=simmim,runlocal,reconstruction=progressive"]
)
def test_amt_configs_validate_on_mae_and_simmim(path, arg):
    config = load(path).get_config(arg)
    throwing = validated(config).method.throwing
    assert config.method.name == ("simmim" if "simmim" in (arg or "") else "mae")
    assert config.method.sampler == "amt" and throwing.layout.num_thrown > 0
    assert throwing.reconstruction == ("progressive" if "progressive" in (arg or "") else "partial")


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


@pytest.mark.parametrize("path", LOCALMIM, ids=lambda p: p.stem)
@pytest.mark.parametrize(
    "arg, reconstruction, throw",
    [
        (None, "full", 0.0),
        ("runlocal", "full", 0.0),
        ("reconstruction=partial,sampler=random_throw,throw=0.25", "partial", 0.25),
        ("reconstruction=progressive", "progressive", 0.65),  # the paper's Table 4 rho_d
    ],
)
def test_localmim_configs_validate_with_one_key_for_pr_mim(path, arg, reconstruction, throw):
    config = load(path).get_config(arg)
    throwing = validated(config).method.throwing
    assert (throwing.reconstruction, throwing.layout.throw_ratio) == (reconstruction, throw)
    assert config.data.image_size == config.model.image_size


@pytest.mark.parametrize("path", MFF + TEC, ids=lambda p: p.stem)
@pytest.mark.parametrize(
    "arg, reconstruction, throw",
    [
        (None, "full", 0.0),
        ("runlocal", "full", 0.0),
        ("reconstruction=partial,sampler=random_throw,throw=0.25", "partial", 0.25),
        ("reconstruction=progressive", "progressive", 0.5),  # the paper's Table 4 rho_d
    ],
)
def test_mff_and_tec_configs_validate_with_one_key_for_pr_mim(path, arg, reconstruction, throw, tmp_path):
    config = load(path).get_config(arg)
    if framework(path) == "tec":  # the teacher is the user's to give, and validation says how
        with pytest.raises(ValueError, match=r"teacher\.checkpoint=PATH.*teacher\.workdir=DIR"):
            validated(config)
        config.method.teacher.checkpoint = str(tmp_path / "teacher.pth")  # read when a run starts, not here
    throwing = validated(config).method.throwing
    assert (throwing.reconstruction, throwing.layout.throw_ratio) == (reconstruction, throw)
    assert config.data.image_size == config.model.image_size


def test_tec_teacher_argument_picks_the_official_attention_targets():
    # sail-sg/TEC README.md: iBOT teacher --topkatt 9 --att_tau 1.0 (L134-140), MAE teacher 15 and 1.8 (L53-60).
    path = next(p for p in TEC if p.stem == "pretrain_tec_in1k")
    ibot, mae_teacher = (load(path).get_config(arg).method for arg in (None, "teacher=mae"))
    assert (ibot.attention_top_k, ibot.attention_temperature) == (9, 1.0)
    assert (mae_teacher.attention_top_k, mae_teacher.attention_temperature) == (15, 1.8)


@pytest.mark.parametrize("path", CLASSIFY, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_classifier_configs_validate(path, arg):
    config = load(path).get_config(arg)
    config.batch_size = 8 * (config.batch_size // 8)
    config.evals.accuracy.batch_size = 8 * max(1, config.evals.accuracy.batch_size // 8)
    setup = train.validate(config)
    assert config.data.image_size == config.model.image_size
    assert setup.method.model.num_classes == config.model.num_classes


def test_finetune_in1k_blocks_argument_trains_the_last_blocks_only():  # the paper's Fig. 6
    module = load(CONFIGS[[p.stem for p in CONFIGS].index("finetune_in1k")])
    assert (
        module.get_config("blocks=4").model.trainable_blocks == 4 and module.get_config().model.trainable_blocks is None
    )


def test_finetune_fmnist_default_is_the_measured_recipe_and_table_14_stays_one_argument_away():
    module = load(CONFIGS[[p.stem for p in CONFIGS].index("finetune_fmnist")])
    measured = module.get_config()  # benchmarks/results/main_job_cpu.md: 90% test top-1 from the main job
    assert (measured.batch_size, measured.total_steps, measured.optimizer.warmup_steps) == (64, 4000, 400)
    assert (measured.optimizer.base_lr, measured.optimizer.layer_decay, measured.model.drop_path_rate) == (3e-3, 0.9, 0)
    assert tuple(measured.data.crop_scale) == tuple(measured.data.crop_ratio) == (1.0, 1.0) and measured.data.flip
    assert measured.data.rand_augment is None and measured.data.random_erase_prob == 0
    assert (measured.mixing.mixup_alpha, measured.mixing.cutmix_alpha, measured.mixing.label_smoothing) == (0, 0, 0.1)
    assert measured.model.head == "batchnorm_linear"
    paper = module.get_config("recipe=table14")
    assert (paper.optimizer.base_lr, paper.optimizer.layer_decay, paper.model.drop_path_rate) == (1e-3, 0.75, 0.1)
    assert paper.data.rand_augment == "rand-m9-mstd0.5-inc1" and paper.data.random_erase_prob == 0.25
    assert tuple(paper.data.crop_scale) == (0.08, 1.0) and paper.model.head == "linear"
    assert (paper.mixing.mixup_alpha, paper.mixing.cutmix_alpha) == (0.8, 1.0)
    swin = load(CONFIGS[[p.stem for p in CONFIGS].index("finetune_swin_fmnist")]).get_config()
    assert swin.data.rand_augment == paper.data.rand_augment and swin.mixing.mixup_alpha == 0.8
    with pytest.raises(ValueError, match=r"recipe='table15'; choose one of \('fmnist', 'table14'\)"):
        module.get_config("recipe=table15")


def test_config_arguments_are_typed_by_what_the_config_declares():
    spec = dict(runlocal=False, method="prmim", throw=float, steps=int)
    options = config_args.parse("runlocal, method=mae,throw=0.25", **spec)
    assert options.to_dict() == {"runlocal": True, "method": "mae", "throw": 0.25, "steps": None}
    assert config_args.parse(None, **spec).to_dict() == {
        "runlocal": False,
        "method": "prmim",
        "throw": None,
        "steps": None,
    }
    with pytest.raises(ValueError, match="config argument steps='many' must be an integer"):
        config_args.parse("steps=many", **spec)
    with pytest.raises(ValueError, match="'throw' needs a value"):
        config_args.parse("throw", **spec)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_refuses_an_argument_it_does_not_take_naming_the_closest(path):
    # A typo must never silently launch the full job: ':runloacl' is refused before anything is built.
    with pytest.raises(ValueError, match="unknown config argument 'runloacl': did you mean 'runlocal'"):
        load(path).get_config("runloacl")
