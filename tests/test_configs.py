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
    """The method a config runs, from its name: ``pretrain_<framework>_<data>.py``; ``pretrain_<data>.py`` is MAE."""
    parts = path.stem.split("_")
    return "classify" if parts[0] != "pretrain" else parts[1] if len(parts) == 3 else "mae"


PRETRAIN = [p for p in CONFIGS if framework(p) == "mae"]
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


def test_localmim_in1k_config_is_the_official_vit_b_recipe():
    config = load(LOCALMIM[[p.stem for p in LOCALMIM].index("pretrain_localmim_in1k")]).get_config()
    steps_per_epoch = 1_281_167 // 2048
    assert config.batch_size == 2048 and config.total_steps == 100 * steps_per_epoch
    assert config.optimizer.warmup_steps == 10 * steps_per_epoch  # 10 warmup epochs at 100 epochs
    assert (config.optimizer.base_lr, config.optimizer.min_lr, config.optimizer.b2) == (2e-4, 1e-6, 0.95)
    assert config.method.mask_ratio == 0.75 and config.model.variant == "B/16"
    assert (config.model.decoder_width, config.model.decoder_depth, config.model.hog_bins) == (256, 1, 9)


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


def test_mff_and_tec_in1k_configs_are_the_official_recipes():
    by_name = {p.stem: p for p in MFF + TEC}
    steps_per_epoch = 1_281_167 // 4096
    mff = load(by_name["pretrain_mff_in1k"]).get_config()
    tec = load(by_name["pretrain_tec_in1k"]).get_config()
    for config, epochs in ((mff, 800), (tec, 300)):
        assert config.batch_size == 4096 and config.total_steps == epochs * steps_per_epoch
        assert config.optimizer.warmup_steps == 40 * steps_per_epoch and config.optimizer.base_lr == 1.5e-4
        assert (config.optimizer.b2, config.optimizer.weight_decay, config.method.mask_ratio) == (0.95, 0.05, 0.75)
        assert config.model.variant == "B/16" and config.model.decoder_width == 512
    assert mff.method.fused_blocks == (1, 3, 5, 7, 9) and mff.method.norm_pix_loss and mff.model.decoder_depth == 8
    assert (tec.model.decoder_depth, tec.model.cls_token_mlp, tec.method.feature_blocks) == (2, True, 2)
    assert (tec.method.attention_top_k, tec.method.attention_temperature) == (9, 1.0)  # iBOT teacher
    mae_teacher = load(by_name["pretrain_tec_in1k"]).get_config("teacher=mae").method
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
