"""One validation pass refuses every malformed config before anything is created or compiled, in one line naming
the key and the fix; every key the documentation lists or shows can be overridden from the command line.

The table holds one row per malformed config: which experiment it starts from (``pretrain``: a tiny MAE run on
Fashion-MNIST; ``simmim``; ``finetune``; ``swin``: a Swin fine-tune), the edit, and what the message must say. ``train.validate`` is the whole
check (no step is compiled), so the table runs in about a second.
"""

import ast
import importlib.util
import math
import pathlib
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from absl import flags
from conftest import mae_experiment
from ml_collections import config_flags
from PIL import Image

from prmim_jax import methods, optim, train
from prmim_jax.data import schema
from prmim_jax.evaluate import eval_config
from prmim_jax.models import mae

# ml_collections loads config files with importlib's deprecated load_module(); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

ROOT = pathlib.Path(__file__).parent.parent
CONFIGS = sorted(path for path in (ROOT / "configs").glob("*.py") if "def get_config(" in path.read_text())


def load_config(name: str, arg=None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def pretrain_config() -> ml_collections.ConfigDict:
    """A tiny PR-MIM run on Fashion-MNIST (7x7 token grid), its batches split over the suite's 8 devices."""
    config = mae_experiment()
    config.batch_size, config.total_steps = 16, 6
    sizes = dict(width=32, depth=1, num_heads=4, decoder_width=16, decoder_depth=1, decoder_num_heads=2)
    config.model = mae.model_config("Ti/4", image_size=28, channels=1, **sizes)
    config.method = methods.method_config("prmim", sampler="furthest", throw_ratio=0.5)
    config.optimizer.update(base_lr=1e-3, warmup_steps=1)
    config.data = schema.data_config(source="fashion_mnist")
    config.evals.knn.update(k=5, train_examples=200, test_examples=100, batch_size=40)
    config.evals.reconstruction = eval_config("reconstruction")
    config.log_every, config.checkpoint_every = 1, 3
    return config


def split_over_8(config):
    """``config`` with batches of 64, which the suite's 8 simulated devices split (the configs' own may not)."""
    config.batch_size = 64
    for section in config.evals.values():
        if "batch_size" in section:
            section.batch_size = 64
    return config


BASES = {
    "pretrain": pretrain_config,
    "simmim": lambda: split_over_8(load_config("pretrain_simmim_fmnist", "runlocal")),
    "finetune": lambda: split_over_8(load_config("finetune_fmnist", "runlocal")),
    "swin": lambda: split_over_8(load_config("finetune_swin_fmnist", "runlocal")),
    "localmim": lambda: split_over_8(load_config("pretrain_localmim_fmnist", "runlocal")),
    "mff": lambda: split_over_8(load_config("pretrain_mff_fmnist", "runlocal")),
    "greenmim": lambda: split_over_8(load_config("pretrain_greenmim_fmnist", "runlocal")),
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """``root/train/{a,b}/``: three 8x8 PNGs and no evaluation folder (the layout a user points data.path at)."""
    root = tmp_path_factory.mktemp("folder")
    for name in ("a/0.png", "a/1.png", "b/0.png"):
        (root / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / "train" / name)
    return root


def as_folder(config, root, **data):
    """``config`` reading the image folder ``root`` at 28 px grayscale, as ``--config.data.source=image_folder``
    plus ``--config.data.path`` would leave it: Fashion-MNIST's other data keys (eval_split 'test') stay."""
    config.data.update(source="image_folder", path=str(root), **data)
    return config


def with_key(config, path: str, value):
    """``config`` with ``path`` set to ``value``, a key it may not have (a typo in a Python config)."""
    *parents, key = path.split(".")
    section = config
    for parent in parents:
        section = section[parent]
    section[key] = value  # experiment configs are unlocked; the command line's are not (tested below)
    return config


def retyped(config, path: str, value):
    """A copy of ``config`` with ``path`` holding ``value`` of another type (as a config built from a dict could)."""
    tree = config.to_dict()
    *parents, key = path.split(".")
    section = tree
    for parent in parents:
        section = section[parent]
    section[key] = value
    return ml_collections.ConfigDict(tree)


# (base, edit(config, image_folder), what the message must say)
MALFORMED = {
    # --- the loop -------------------------------------------------------------------------------------
    "negative_batch_size": (
        "pretrain",
        lambda c, _: c.update(batch_size=-8),
        r"^batch_size=-8 must be an integer >= 1; set --config.batch_size",
    ),
    "batch_not_split_over_devices": (
        "pretrain",
        lambda c, _: c.update(batch_size=12),
        "batch_size=12 must be divisible by the 8 devices",
    ),
    "zero_total_steps": ("pretrain", lambda c, _: c.update(total_steps=0), r"^total_steps=0 must be an integer >= 1"),
    "zero_log_every": (
        "pretrain",
        lambda c, _: c.update(log_every=0),
        r"^log_every=0 must be an integer >= 1; set --config.log_every to a positive number of steps",
    ),
    "zero_checkpoint_every": (
        "pretrain",
        lambda c, _: c.update(checkpoint_every=0),
        r"^checkpoint_every=0 must be .* --config.checkpoint_every",
    ),
    "keep_no_checkpoints": (
        "pretrain",
        lambda c, _: c.update(keep_checkpoints=0),
        r"^keep_checkpoints=0 must be an integer >= 1; a finished run would keep no checkpoint",
    ),
    "negative_stop_after": (
        "pretrain",
        lambda c, _: c.update(stop_after=-1),
        r"^stop_after=-1 must be an integer >= 0",
    ),
    "negative_seed": ("pretrain", lambda c, _: c.update(seed=-1), r"^seed=-1 must be an integer >= 0"),
    "no_microbatches": (
        "pretrain",
        lambda c, _: c.update(grad_accum_steps=0),
        r"^grad_accum_steps=0 must be an integer >= 1; set --config.grad_accum_steps",
    ),
    "microbatches_not_split_over_devices": (
        "pretrain",
        lambda c, _: c.update(grad_accum_steps=4),
        r"^batch_size=16 must split into grad_accum_steps=4 microbatches, each divisible by the 8 devices",
    ),
    "profile_after_the_last_step": (
        "pretrain",
        lambda c, _: c.profile.update(start_step=6, num_steps=2),
        r"^profile.start_step=6 leaves no step of total_steps=6 to trace; lower --config.profile.start_step",
    ),
    "negative_profile_steps": (
        "pretrain",
        lambda c, _: c.profile.update(num_steps=-1),
        r"^profile.num_steps=-1 must be an integer >= 0",
    ),
    "compilation_cache_without_a_directory": (
        "pretrain",
        lambda c, _: c.compilation_cache.update(directory=""),
        r"^compilation_cache.directory is empty; set --config.compilation_cache.directory",
    ),
    "float_batch_size": (
        "pretrain",
        lambda c, _: retyped(c, "batch_size", 16.0),
        r"^batch_size=16.0 must be an integer",
    ),
    # --- unknown keys: the closest known key is suggested ---------------------------------------------
    "unknown_top_level_key": ("pretrain", lambda c, _: with_key(c, "foo", 1), r"^unknown config key 'foo'"),
    "typo_in_optimizer": (
        "pretrain",
        lambda c, _: with_key(c, "optimizer.base_lrr", 1e-3),
        r"unknown config key 'optimizer.base_lrr': did you mean --config.optimizer.base_lr\?",
    ),
    "typo_in_data": (
        "pretrain",
        lambda c, _: with_key(c, "data.num_worker", 2),
        r"did you mean --config.data.num_workers\?",
    ),
    "typo_in_evals": ("pretrain", lambda c, _: with_key(c, "evals.knn.kk", 5), r"did you mean --config.evals.knn.k\?"),
    "typo_in_model": (
        "pretrain",
        lambda c, _: with_key(c, "model.patch", 4),
        r"did you mean --config.model.patch_size\?",
    ),
    "typo_in_method": (
        "pretrain",
        lambda c, _: with_key(c, "method.kernal_size", 3),
        r"did you mean --config.method.kernel_size\?",
    ),
    "typo_in_sharding": (
        "pretrain",
        lambda c, _: with_key(c, "sharding.meshes", ()),
        r"did you mean --config.sharding.mesh\?",
    ),
    "typo_in_mixing": (
        "finetune",
        lambda c, _: with_key(c, "mixing.mixup", 0.2),
        r"did you mean --config.mixing.mixup_alpha\?",
    ),
    "wrong_type": ("pretrain", lambda c, _: retyped(c, "data.flip", "yes"), r"^data.flip='yes' must be a bool"),
    # --- keys that moved: where they went ---------------------------------------------------------------
    "moved_knn_section": (
        "pretrain",
        lambda c, _: with_key(c, "knn", ml_collections.ConfigDict(dict(k=5))),
        r"^config key 'knn.KEY' has moved: set --config.evals.knn.KEY instead",
    ),
    "moved_picture_every": (
        "pretrain",
        lambda c, _: with_key(c, "picture_every", 250),
        r"^config key 'picture_every' has moved: set --config.evals.reconstruction.every instead",
    ),
    "moved_classifier_eval": (
        "finetune",
        lambda c, _: with_key(c, "eval", ml_collections.ConfigDict(dict(batch_size=8))),
        r"^config key 'eval.KEY' has moved: set --config.evals.accuracy.KEY instead",
    ),
    # --- method ---------------------------------------------------------------------------------------
    "unknown_method": (
        "pretrain",
        lambda c, _: c.method.update(name="maee"),
        r"unknown method 'maee'.*did you mean 'mae'",
    ),
    "throw_more_than_masked": (
        "pretrain",
        lambda c, _: c.method.update(throw_ratio=0.8),
        "only masked tokens can be thrown",
    ),
    "unknown_sampler": ("pretrain", lambda c, _: c.method.update(sampler="nearest"), "unknown token sampler 'nearest'"),
    "running_cell_ratio": (
        "pretrain",
        lambda c, _: c.method.update(sampler="running_cell", throw_ratio=0.3),
        r"sampler 'running_cell' .* throw_ratio must be one of \(0.25, 0.5, 0.75\) \(or 0: nothing thrown\), not 0.3; set method.throw_ratio",
    ),
    "running_cell_videomae_decoder_on_an_odd_grid": (
        "pretrain",
        lambda c, _: c.method.update(
            reconstruction="partial", sampler="running_cell", throw_ratio=0.5, running_cell_decoder="videomae"
        ),
        r"running_cell_decoder='videomae' tiles .* even sides, not 7x7: choose an image size .* or set "
        r"method.running_cell_decoder='masked'",
    ),
    "running_cell_on_units": (
        "simmim",
        lambda c, _: c.method.update(
            reconstruction="progressive", sampler="running_cell", throw_ratio=0.25, throw_granularity="unit"
        ),
        r"sampler 'running_cell' throws single tokens .*; set method.throw_granularity='token'",
    ),
    "amt_interval_of_zero": (
        "pretrain",
        lambda c, _: c.method.update(sampler="amt", amt_interval=0),
        r"^method.amt_interval=0 must be an integer >= 1 \(epochs between two attention-map passes; AMT's 40\); "
        r"set --config.method.amt_interval",
    ),
    "amt_negative_warmup": (
        "pretrain",
        lambda c, _: c.method.update(sampler="amt", amt_warmup_epochs=-1),
        r"^method.amt_warmup_epochs=-1 must be an integer >= 0",
    ),
    "amt_fractional_interval": (
        "pretrain",
        lambda c, _: retyped(c, "method.amt_interval", 2.5),
        r"^method.amt_interval=2.5 must be an integer",
    ),
    "simmim_mask_unit": (
        "simmim",
        lambda c, _: c.method.update(mask_patch_size=3),
        "mask_patch_size=3 must be a multiple",
    ),
    # --- model ----------------------------------------------------------------------------------------
    "zero_patch_size": (
        "pretrain",
        lambda c, _: c.model.update(patch_size=0),
        r"^model.patch_size=0 must be an integer >= 1",
    ),
    "kernel_larger_than_grid": (
        "pretrain",
        lambda c, _: c.model.update(patch_size=7),
        "kernel_size=7 does not fit the 4x4 token grid",
    ),
    "data_and_model_sizes_differ": (
        "pretrain",
        lambda c, _: c.data.update(image_size=32),
        "make data.image_size/channels match model",
    ),
    "simmim_drop_path": (
        "simmim",
        lambda c, _: c.model.update(drop_path_rate=1.0),
        r"drop_path_rate=1.0 must lie in \[0, 1\)",
    ),
    "classifier_blocks": (
        "finetune",
        lambda c, _: c.model.update(trainable_blocks=9),
        r"trainable_blocks=9 must lie in \[0, depth=4\]",
    ),
    # --- data -----------------------------------------------------------------------------------------
    "unknown_source": (
        "pretrain",
        lambda c, _: c.data.update(source="image_folde"),
        r"^data.source='image_folde' is not a data source: did you mean 'image_folder'\?",
    ),
    "rgb_with_one_channel_mean": (
        "pretrain",
        lambda c, _: c.data.update(channels=3),
        r"^data.mean=\(0.286,\) and data.std=\(0.353,\) need one entry per channel \(data.channels=3\); "
        r"set --config.data.mean and --config.data.std",
    ),
    "negative_num_workers": (
        "pretrain",
        lambda c, _: c.data.update(num_workers=-1),
        r"^data.num_workers=-1 must be an integer >= 0",
    ),
    "fashion_mnist_split": (
        "pretrain",
        lambda c, _: c.data.update(split="validation"),
        r"^data.split='validation' is not a Fashion-MNIST split",
    ),
    "crop_scale": (
        "pretrain",
        lambda c, _: c.data.update(crop_scale=(0.5, 0.2)),
        r"^data.crop_scale=\(0.5, 0.2\) must satisfy",
    ),
    "image_folder_without_path": (
        "pretrain",
        lambda c, _: c.data.update(source="image_folder", path=None),
        "source='image_folder' needs data.path",
    ),
    "image_folder_missing": (
        "pretrain",
        lambda c, root: as_folder(c, root / "nowhere"),
        r"^data.path='.*nowhere' is not a folder; set --config.data.path",
    ),
    "image_folder_keeps_fashion_mnists_eval_split": (
        "pretrain",
        lambda c, root: as_folder(c, root),
        r"data.eval_split='test': the image folder has no .*/test/; set --config.data.eval_split to one of its "
        r"folders \['train'\]",
    ),
    "knn_k_larger_than_the_bank": (
        "pretrain",
        lambda c, root: as_folder(c, root, eval_split="train"),
        r"^evals.knn: kNN k=5 exceeds the 3 images of data.split='train', its memory bank; set k to at most 3",
    ),
    # --- optimizer ------------------------------------------------------------------------------------
    "nan_base_lr": (
        "pretrain",
        lambda c, _: c.optimizer.update(base_lr=math.nan),
        r"^optimizer.base_lr=nan must be a finite number > 0; set --config.optimizer.base_lr",
    ),
    "negative_base_lr": (
        "pretrain",
        lambda c, _: c.optimizer.update(base_lr=-1.0),
        r"^optimizer.base_lr=-1.0 must be a finite number > 0",
    ),
    "warmup_past_the_end": (
        "pretrain",
        lambda c, _: c.optimizer.update(warmup_steps=100),
        r"warmup_steps=100 must lie in \[0, total_steps=6\]",
    ),
    "adam_b2_of_one": (
        "pretrain",
        lambda c, _: c.optimizer.update(b2=1.0),
        r"^optimizer.b2=1.0 must be a finite number in \[0, 1\)",
    ),
    "negative_weight_decay": (
        "pretrain",
        lambda c, _: c.optimizer.update(weight_decay=-0.1),
        r"^optimizer.weight_decay=-0.1 must be",
    ),
    "negative_clip": (
        "pretrain",
        lambda c, _: c.optimizer.update(grad_clip_norm=-1.0),
        r"^optimizer.grad_clip_norm=-1.0 must be",
    ),
    "zero_layer_decay": (
        "finetune",
        lambda c, _: c.optimizer.update(layer_decay=0.0),
        r"^optimizer.layer_decay=0.0 must be a finite number in \(0, 1\]",
    ),
    "unknown_optimizer": (
        "finetune",
        lambda c, _: c.optimizer.update(name="sgd"),
        r"optimizer.name='sgd'; choose one of",
    ),
    # --- sharding -------------------------------------------------------------------------------------
    "mesh_does_not_tile": (
        "pretrain",
        lambda c, _: c.sharding.update(mesh=(("data", 3), ("fsdp", -1))),
        "cannot tile 8 devices",
    ),
    "mesh_axis_of_size_zero": (
        "pretrain",
        lambda c, _: c.sharding.update(mesh=(("data", 0), ("fsdp", -1))),
        r"^sharding.mesh=.* must be \(axis name, size\) pairs",
    ),
    "slices_without_a_multi_slice_job": (
        "pretrain",
        lambda c, _: c.sharding.update(mesh=(("dcn", 2), ("data", -1), ("fsdp", 1))),
        r"^sharding.mesh has dcn=2 slices but the devices have no slice_index .* set the 'dcn' axis to 1",
    ),
    "rule_names_a_missing_axis": (
        "pretrain",
        lambda c, _: c.sharding.update(mesh=(("data", -1),)),
        r"^sharding.rules maps 'batch' to mesh axis 'fsdp', which sharding.mesh=.* lacks",
    ),
    # --- evaluators -----------------------------------------------------------------------------------
    "knn_batch_not_split": (
        "pretrain",
        lambda c, _: c.evals.knn.update(batch_size=50),
        r"^evals.knn: kNN batch_size=50 must be divisible by the 8 devices",
    ),
    "knn_k_above_train_examples": (
        "pretrain",
        lambda c, _: c.evals.knn.update(k=300),
        r"^evals.knn: kNN k=300 must lie in \[1, train_examples=200\]",
    ),
    "knn_zero_temperature": (
        "pretrain",
        lambda c, _: c.evals.knn.update(temperature=0.0),
        r"^evals.knn: kNN temperature=0.0 must be positive",
    ),
    "unknown_evaluator": (
        "pretrain",
        lambda c, _: c.evals.knn.update(type="knnn"),
        r"unknown evaluator type 'knnn'.*did you mean 'knn'",
    ),
    "negative_every": (
        "pretrain",
        lambda c, _: c.evals.reconstruction.update(every=-1),
        r"^evals.reconstruction.every=-1 must be an integer >= 0",
    ),
    "accuracy_without_a_classifier": (
        "pretrain",
        lambda c, _: with_key(c, "evals.accuracy", eval_config("accuracy")),
        r"^evals.accuracy: evaluator 'accuracy' needs a classifier",
    ),
    # --- fine-tuning ----------------------------------------------------------------------------------
    "label_smoothing_of_one": (
        "finetune",
        lambda c, _: c.mixing.update(label_smoothing=1.0),
        r"label_smoothing=1.0 must lie in \[0, 1\)",
    ),
    "two_encoders": (
        "finetune",
        lambda c, _: c.init.update(workdir="/a", mae_checkpoint="/b.pth"),
        r"^init.workdir and init.mae_checkpoint are set; set one of init.workdir .* and init.checkpoint .*, not both",
    ),
    # --- Swin fine-tuning -----------------------------------------------------------------------------
    "unknown_architecture": (
        "finetune",
        lambda c, _: c.model.update(architecture="convnext"),
        r"^model.architecture='convnext' is not a backbone: choose one of \('vit', 'simmim_vit', 'swin'\)",
    ),
    "swin_key_in_a_vit": (
        "finetune",
        lambda c, _: with_key(c, "model.window_size", 7),
        r"^unknown config key 'model.window_size'",
    ),
    "typo_in_swin_model": (
        "swin",
        lambda c, _: with_key(c, "model.window", 7),
        r"did you mean --config.model.window_size\?",
    ),
    "swin_window_does_not_tile": (
        "swin",
        lambda c, _: c.model.update(window_size=5),
        r"stage 0's 14x14 token grid does not tile into 5x5 windows; Swin does not pad .* use image_size",
    ),
    "swin_stages_and_heads_differ": (
        "swin",
        lambda c, _: c.model.update(num_heads=(2,)),
        r"depths=\(2, 6\) and num_heads=\(2,\) must name the same",
    ),
    "swin_empty_stage": (
        "swin",
        lambda c, _: c.model.update(depths=(2, 0)),
        r"^model.depths=\(2, 0\) must be positive integers, one per stage",
    ),
    "swin_cls_pool": ("swin", lambda c, _: c.model.update(pool="cls"), "a Swin has no cls token; use pool='avg'"),
    "swin_with_an_mae_checkpoint": (
        "swin",
        lambda c, _: c.init.update(mae_checkpoint="/b.pth"),
        r"^init.mae_checkpoint=/b.pth: the file holds an MAE ViT .* fine-tune it with model.architecture='vit'",
    ),
    "vit_with_a_swin_checkpoint": (
        "finetune",
        lambda c, _: c.init.update(swin_checkpoint="/b.pth"),
        r"^init.swin_checkpoint=/b.pth: the file holds a Swin Transformer .* model.architecture='swin'",
    ),
}


@pytest.mark.parametrize("base", list(BASES))
def test_the_unedited_configs_validate(base):
    train.validate(BASES[base]())


@pytest.mark.parametrize("case", list(MALFORMED))
def test_each_malformed_config_is_refused_in_one_line_naming_the_key_and_the_fix(case, image_folder):
    base, edit, message = MALFORMED[case]
    config = BASES[base]()
    config = edit(config, image_folder) or config
    with pytest.raises(ValueError, match=message) as error:
        train.validate(config)
    assert "\n" not in str(error.value)


def test_a_run_that_is_all_warmup_validates_and_ends_at_the_peak_rate():
    config = pretrain_config()
    config.optimizer.warmup_steps = config.total_steps  # runlocal's warmup with a shortened --config.total_steps
    train.validate(config)
    schedule = optim.learning_rate_schedule(config.optimizer, config.batch_size, config.total_steps)
    peak = optim.peak_learning_rate(config.optimizer, config.batch_size)
    assert float(schedule(0)) == 0.0 and math.isclose(float(schedule(config.total_steps)), peak, rel_tol=1e-6)


def test_a_refused_config_leaves_no_workdir(tmp_path):
    config = pretrain_config()
    config.batch_size = -8  # used to fail in XLA after the workdir was made
    with pytest.raises(ValueError, match="batch_size=-8"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_image_folder_reads_its_own_evaluation_split_when_it_has_one(image_folder, tmp_path):
    (tmp_path / "val").symlink_to(image_folder / "train")
    (tmp_path / "train").symlink_to(image_folder / "train")
    config = as_folder(pretrain_config(), tmp_path, eval_split="val")
    config.evals.knn.k = 3
    assert train.validate(config).evaluators["knn"].data.eval_split == "val"
    assert schema.data_config(source="image_folder", path=str(tmp_path)).eval_split == "val"  # MAE's layout


# --- the command line ------------------------------------------------------------------------------


def test_an_unknown_command_line_key_is_one_line_with_the_closest_key_and_exit_status_2(tmp_path):
    command = [sys.executable, "-m", "prmim_jax.main", "--config", str(ROOT / "configs/pretrain_fmnist.py")]
    command += ["--workdir", str(tmp_path / "run"), "--config.optimizer.base_lrr=1e-3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "unknown config key 'optimizer.base_lrr': did you mean --config.optimizer.base_lr?" in lines[0]
    assert not (tmp_path / "run").exists()


def parse_overrides(config_file: pathlib.Path, *overrides: str) -> ml_collections.ConfigDict:
    """``config_file`` with ``overrides`` (``--config.KEY=VALUE``) applied by the flag parser ``main.py`` uses."""
    argv = ["prog", f"--config={config_file}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))


def documented_keys() -> list[str]:
    """``section.key`` for every key of docs/pretraining.md's key table (``| section | keys |``)."""
    text = (ROOT / "docs" / "pretraining.md").read_text()
    table = text[text.index("| section | keys |") :].split("\n\n", 1)[0]
    keys = []
    for row in table.splitlines()[2:]:
        section_cell, keys_cell = row.strip("|").split("|", 1)
        section = re.findall(r"`([^`]+)`", section_cell)
        prefix = f"{section[0]}." if section else ""
        keys += [prefix + key for key in re.findall(r"`([a-z_0-9]+)`", keys_cell)]
    return keys


def documented_examples() -> list[tuple[str, str]]:
    """``(path, value)`` of every ``--config.PATH=VALUE`` the README and docs/ show (``KEY`` placeholders left
    out)."""
    text = "\n".join(path.read_text() for path in DOCUMENTS)
    found = re.findall(r"--config\.([A-Za-z_.0-9]+)=('[^']*'|[^\s`)\]]+)", text)
    return sorted({(path, value.strip("'")) for path, value in found if path.lower() == path})


def lookup(config, path: str):
    for key in path.split("."):
        if not isinstance(config, ml_collections.ConfigDict) or key not in config:
            raise KeyError(path)
        config = config[key]
    return config


@pytest.fixture(scope="module")
def config_files():
    """``{config file: its default config}``, to find one that has a given key."""
    return {path: load_config(path.stem) for path in CONFIGS}


def holder(config_files, path: str) -> pathlib.Path:
    for file, config in config_files.items():
        try:
            lookup(config, path)
            return file
        except KeyError:
            continue
    raise AssertionError(f"the documentation shows --config.{path}, which no config in configs/ has")


def command_line_value(config, path: str) -> str:
    """A value for ``--config.PATH=``: its current one, or one of its type where it is a typed None."""
    *parents, key = path.split(".")
    section = lookup(config, ".".join(parents)) if parents else config
    value = section[key]
    if value is None:
        return {int: "3", float: "0.5", str: "x"}[section.get_type(key)]
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, tuple) else str(value)


def test_every_key_in_the_documented_table_is_overridden_from_the_command_line(config_files):
    keys = documented_keys()
    assert len(keys) > 80 and "model.patch_size" in keys and "optimizer.grad_clip_norm" in keys
    for path in keys:
        file = holder(config_files, path)
        value = command_line_value(config_files[file], path)
        overridden = lookup(parse_overrides(file, f"--config.{path}={value}"), path)
        assert str(overridden).lower() == value.lower() or repr(overridden) == value, (path, value, overridden)


def as_written(value: str):
    """A command-line value as Python reads it (``'(0.5, 0.5, 0.5)'`` a tuple, ``512`` an int), else the string."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def test_every_command_line_example_in_the_documentation_applies(config_files):
    examples = documented_examples()
    assert ("batch_size", "512") in examples and ("method.throw_ratio", "0.25") in examples
    for path, value in examples:
        file = holder(config_files, path)
        overridden = lookup(parse_overrides(file, f"--config.{path}={value}"), path)
        assert overridden == as_written(value) or str(overridden) == value, (path, value, overridden)


def test_typed_placeholders_keep_their_type_through_sections():
    assert schema.data_config(source="tfds", name="x", data_dir=None).get_type("data_dir") is str
    model = mae.model_config("Ti/4", patch_size=None)
    assert model.get_type("patch_size") is int and model.patch_size is None
    assert parse_overrides(CONFIGS[0], "--config.model.patch_size=7").model.patch_size == 7
