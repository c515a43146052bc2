"""Training at scale: microbatches give one big batch's update, a profile is a trace that changes no number,
the progress lines carry TFLOP/s per device (and MFU where the device's peak is known), the second launch
of a run reads its programs from the compilation cache, a ``dcn`` axis puts each slice on its own index of
the mesh, and pictures name their rows."""

import dataclasses
import os
import pathlib
import subprocess
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from conftest import xla_flags
from test_finetune import tiny_finetune_config
from test_train import ROOT, read_metrics, synthetic_batch, tiny_config

from prmim_jax import main, optim, pictures, sharding, throughput, train

# --- gradient accumulation -----------------------------------------------------------------------


def sgd_step(config, devices, batch, monkeypatch):
    """The trainer's compiled step, once, from a fresh state, with plain SGD at rate 1 in place of the method's
    optimizer, so that the update is minus the gradient (AdamW's first step is about the gradient's sign):
    ``(metrics, gradient, state after)`` on the host."""
    setup = train.validate(config, devices)
    monkeypatch.setattr(type(setup.method), "optimizer", lambda self, *_: optax.sgd(1.0))
    rng = jax.random.key(0)
    init_fn, _, shardings = train.abstract_state(setup, config, rng)
    state = train.create_state(setup, init_fn, shardings, rng)
    before = jax.device_get(state.params)
    step_fn, batch_sharding = train.compile_train_step(setup, shardings)
    state, metrics = step_fn(state, sharding.global_batch(batch, batch_sharding), jax.random.key(1))
    state = jax.device_get(state)
    return jax.device_get(metrics), jax.tree_util.tree_map(np.subtract, before, state.params), state


def test_four_microbatches_over_data_and_fsdp_give_the_gradient_of_one_batch_on_one_device(monkeypatch):
    one = tiny_config(sharding=sharding.sharding_config(mesh=(("data", 1), ("fsdp", 1))))
    micro = tiny_config(grad_accum_steps=4, sharding=sharding.sharding_config(mesh=(("data", 2), ("fsdp", 2))))
    batch = synthetic_batch(one)
    one_metrics, one_gradient, _ = sgd_step(one, jax.devices()[:1], batch, monkeypatch)
    metrics, gradient, _ = sgd_step(micro, jax.devices()[:4], batch, monkeypatch)
    np.testing.assert_allclose(metrics["loss"], one_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], one_metrics["grad_norm"], rtol=1e-5)
    scale = max(np.abs(g).max() for g in jax.tree_util.tree_leaves(one_gradient))
    for a, b in zip(jax.tree_util.tree_leaves(gradient), jax.tree_util.tree_leaves(one_gradient), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)  # float32 sums in another order
    # batch_size is the images of one update, whatever grad_accum_steps: the learning rate scales with it.
    micro.optimizer.warmup_steps = 0
    setup = train.validate(micro, jax.devices()[:4])
    assert (setup.global_batch, setup.accum_steps) == (micro.batch_size, 4)
    schedule = optim.learning_rate_schedule(micro.optimizer, setup.global_batch, micro.total_steps)
    assert float(schedule(0)) == pytest.approx(micro.optimizer.base_lr * micro.batch_size / 256)


def test_with_a_batchnorm_head_microbatches_keep_their_own_statistics_averaged_once_per_update(monkeypatch):
    # A linear probe (MAE's BatchNorm head). Each microbatch is normalised by its own statistics (ghost batch
    # norm); the running statistics are the mean of what each microbatch alone would give, so the running
    # mean is the big batch's: the head's BatchNorm normalises encoder features, which do not depend on it.
    def probe(batch_size, grad_accum_steps=1):
        config = tiny_finetune_config(batch_size=batch_size, grad_accum_steps=grad_accum_steps)
        config.model.update(pool="cls", head="batchnorm_linear", head_init_std=0.01, trainable_blocks=0)
        config.model.drop_path_rate = 0.0
        return config

    rng = np.random.default_rng(0)
    batch = {
        "images": rng.normal(size=(16, 28, 28, 1)).astype(np.float32),
        "labels": rng.integers(0, 10, size=16).astype(np.int32),
    }
    devices = jax.devices()[:1]
    _, _, micro = sgd_step(probe(16, grad_accum_steps=2), devices, batch, monkeypatch)
    # Microbatch j holds images j, j + 2, j + 4, ... (train_step.microbatches).
    alone = [sgd_step(probe(8), devices, {k: v[j::2] for k, v in batch.items()}, monkeypatch)[2] for j in (0, 1)]
    expected = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, alone[0].batch_stats, alone[1].batch_stats)
    for a, b in zip(jax.tree_util.tree_leaves(micro.batch_stats), jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# --- profiles, throughput, the compilation cache: two launches of one tiny run ---------------------------

# A tiny MAE run of its own (test_train's model, no evaluators), outside the test process: the test process
# keeps its own compilation cache (conftest), which this run's config must not redirect.
TINY_RUN = """
from prmim_jax import base_config, methods, optim
from prmim_jax.data import schema
from prmim_jax.models import mae


def get_config(arg=None):
    model = mae.model_config(
        "Ti/4", width=32, depth=1, num_heads=4, image_size=28, channels=1,
        decoder_width=16, decoder_depth=1, decoder_num_heads=2,
    )
    config = base_config.experiment_config(
        batch_size=8, total_steps=3, log_every=1, checkpoint_every=3, model=model,
        method=methods.method_config("prmim", sampler="furthest", throw_ratio=0.5),
        optimizer=optim.optimizer_config(base_lr=1e-3), data=schema.data_config(source="fashion_mnist"),
    )
    if arg == "profile":
        config.profile.update(start_step=1, num_steps=1)
    return config
"""


def cache_entries(directory: pathlib.Path) -> set[str]:
    return {path.name for path in directory.iterdir()} if directory.exists() else set()


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """The tiny run launched twice through ``main.py`` with one compilation cache: first traced
    (``profile``: step 2), then not. ``{name: (workdir, stdout, stderr, cache entries after it)}``."""
    root = tmp_path_factory.mktemp("launches")
    (root / "tiny_run.py").write_text(TINY_RUN)
    cache = root / "xla_cache"
    # The run's own cache, not the one the suite gives the runs it launches (conftest); JAX_LOG_COMPILES: each
    # cache hit is a line on stderr.
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONPATH=str(ROOT), JAX_LOG_COMPILES="1")
    env["JAX_COMPILATION_CACHE_DIR"] = ""
    results = {}
    for name, arg in (("cold", ":profile"), ("warm", "")):
        command = [sys.executable, "-m", "prmim_jax.main", f"--config={root / 'tiny_run.py'}{arg}"]
        command += [f"--workdir={root / name}", f"--config.compilation_cache.directory={cache}"]
        command += ["--config.compilation_cache.min_compile_seconds=0"]  # tiny programs compile in milliseconds
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = (root / name, done.stdout, done.stderr, cache_entries(cache))
    return results


def test_the_second_launch_reads_every_program_from_the_compilation_cache(launches):
    _, _, cold_log, after_cold = launches["cold"]
    _, _, warm_log, after_warm = launches["warm"]
    assert any(name.startswith("jit_train_step") for name in after_cold)
    hit = "Persistent compilation cache hit for 'jit_train_step'"
    assert hit not in cold_log and hit in warm_log
    assert after_warm == after_cold  # nothing compiled anew, so nothing written


def test_a_profile_is_a_trace_of_the_requested_steps_that_changes_no_number(launches):
    cold, cold_out, _, _ = launches["cold"]
    warm = launches["warm"][0]
    assert list((cold / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert f"profile of steps 2-2 written to {cold / 'profile'}" in cold_out
    assert not (warm / "profile").exists()  # off by default
    losses = [[row["loss"] for row in read_metrics(w)] for w in (cold, warm)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_progress_lines_carry_tflops_per_device_and_no_mfu_on_a_cpu(launches):
    workdir, stdout, _, _ = launches["warm"]
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all(" TFLOP/s/device | ETA " in line for line in lines), lines
    rows = [row for row in read_metrics(workdir) if "loss" in row]
    assert all(row["tflops_per_device"] > 0 and "mfu" not in row for row in rows)  # a CPU has no known peak


def test_a_step_in_microbatches_counts_the_flops_of_the_whole_batch_also_where_the_backend_counts_none(
    monkeypatch,
):
    # XLA counts the microbatches' loop body once; a GPU's step with cuDNN's attention has no count at all.
    config = tiny_config(grad_accum_steps=2)
    setup = train.validate(config)
    _, boxed, shardings = train.abstract_state(setup, config, jax.random.key(0))
    state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(boxed))
    batch, rng = setup.method.batch_spec(config.batch_size), jax.random.key(0)
    whole = train.compile_train_step(dataclasses.replace(setup, accum_steps=1), shardings)[0]
    counted = throughput.flops(whole.lower(state, batch, rng).cost_analysis())
    # The unsharded program the count lowers is the trainer's without its sharding constraints: a few
    # scalar operations apart.
    assert train.count_step_flops(setup, state, batch, rng) == pytest.approx(counted, rel=1e-4)
    real_cost_analysis, uncounted = jax.stages.Lowered.cost_analysis, []

    def no_count_on_the_backend(self):
        if not uncounted:
            uncounted.append(self)
            return None
        return real_cost_analysis(self)

    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", no_count_on_the_backend)
    assert train.count_step_flops(setup, state, batch, rng) == pytest.approx(counted, rel=1e-4) and uncounted


# --- multi-slice meshes --------------------------------------------------------------------------------


def fake_devices(slices: int, per_slice: int, slice_index: bool = True) -> list:
    """Stand-ins for the devices of a multi-slice job, as ``create_hybrid_device_mesh`` reads them, listed in an
    order that mixes the slices (JAX promises none)."""
    devices = []
    for i in range(slices * per_slice):
        device = types.SimpleNamespace(id=i, process_index=i // 2, device_kind="fake", platform="fake")
        if slice_index:
            device.slice_index = i % slices
        devices.append(device)
    return devices


def test_a_dcn_axis_gives_each_slice_its_own_index_and_the_batch_is_split_over_it_too():
    config = sharding.sharding_config(mesh=(("dcn", 2), ("data", -1), ("fsdp", 2)))
    shape = sharding.mesh_shape(config, 8)
    grid = sharding.device_grid(shape, fake_devices(2, 4))
    assert shape == {"dcn": 2, "data": 2, "fsdp": 2} and grid.shape == (2, 2, 2)
    for index in range(2):
        assert {device.slice_index for device in grid[index].flat} == {index}
    assert dict(sharding.DEFAULT_RULES)["batch"] == ("dcn", "data", "fsdp")


def test_a_dcn_axis_on_devices_without_slices_or_of_the_wrong_count_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"no slice_index .*; set the 'dcn' axis to 1, or leave it out"):
        sharding.device_grid({"dcn": 2, "data": 4}, fake_devices(2, 4, slice_index=False))
    with pytest.raises(ValueError, match=r"the devices lie on 2 slices; set the 'dcn' axis of .* to 2"):
        sharding.device_grid({"dcn": 4, "data": 2}, fake_devices(2, 4))


def test_meshes_without_a_dcn_axis_keep_working_with_rules_that_name_it():
    placement = sharding.Placement.from_config(sharding.sharding_config(mesh=(("data", 4), ("fsdp", 2))))
    assert placement.batch_sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    one_slice = sharding.Placement.from_config(sharding.sharding_config(mesh=(("dcn", 1), ("data", -1), ("fsdp", 1))))
    assert one_slice.batch_divisor == 8


# --- pictures ------------------------------------------------------------------------------------------


def test_each_row_of_a_reconstruction_picture_is_labelled_and_the_token_map_has_its_colour_key():
    rows = np.random.default_rng(0).uniform(size=(4, 2, 28, 28, 3)).astype(np.float32)
    scale = pictures.picture_scale(28)  # 112-pixel rows, as every picture has at least
    bare = pictures.tile(rows, scale=scale)
    labelled = pictures.tile(rows, scale=scale, labels=pictures.ROW_LABELS)
    width = labelled.shape[1] - bare.shape[1]
    assert labelled.shape[0] == bare.shape[0] and width > 0
    np.testing.assert_array_equal(labelled[:, width:], bare)  # the images as they were, to the right
    cells = [labelled[r * 114 : r * 114 + 112, :width] for r in range(4)]  # 2-pixel gaps
    assert all((cell < 100).all(axis=-1).any() for cell in cells)  # dark ink in every row's label
    for colour in (pictures.DECODED_CELL, pictures.THROWN_CELL):
        swatch = np.round(np.asarray(colour) * 255)
        assert np.all(cells[3] == swatch, axis=-1).any() and not np.all(cells[0] == swatch, axis=-1).any()


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections loading a config file
def test_a_moved_command_line_key_is_refused_naming_where_it_went():
    config = str(ROOT / "configs/pretrain_fmnist.py")
    moved = {
        "--config.picture_every=100": "set --config.evals.reconstruction.every instead",
        "--config.knn.k=5": "set --config.evals.knn.k instead",
    }
    for override, message in moved.items():
        assert message in main.unknown_override(["main.py", f"--config={config}", override])
