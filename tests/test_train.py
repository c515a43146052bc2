"""The training system: sharded steps agree with one device, resume is exact, non-finite losses leave
good checkpoints, bad configs fail before compiling, and whole runs work (signals and failures of real
processes: test_failures.py)."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import free_port, load_run, mae_experiment, xla_flags

from prmim_jax import masking, methods, sharding, train
from prmim_jax.data import schema
from prmim_jax.evaluate import eval_config
from prmim_jax.models import mae

ROOT = pathlib.Path(__file__).parent.parent


def tiny_config(**overrides):
    """A 28x28 Fashion-MNIST run small enough for a few seconds a step on CPU: 7x7 grid (patch 4)."""
    config = mae_experiment()
    config.seed = 0
    config.batch_size = 16
    config.total_steps = 6
    config.model = mae.model_config(
        "Ti/4",
        width=32,
        depth=1,
        num_heads=4,
        image_size=28,
        channels=1,
        decoder_width=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    config.method = methods.method_config("prmim", sampler="furthest", throw_ratio=0.5)
    config.optimizer.update(base_lr=1e-3, warmup_steps=1)
    config.data = schema.data_config(source="fashion_mnist")
    config.evals.knn.update(every=0, k=5, train_examples=200, test_examples=100, batch_size=40)
    config.log_every = 1
    config.checkpoint_every = 3
    pictures_every = overrides.pop("picture_every", 0)
    if pictures_every:
        config.evals.reconstruction = eval_config("reconstruction", every=pictures_every)
    config.update(overrides)
    return config


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(workdir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(workdir) if "loss" in row}


# --- sharding ------------------------------------------------------------------------------------


def run_steps(config, devices, batch, steps=2):
    setup = train.validate(config, devices)
    rng = jax.random.key(0)
    init_fn, _, shardings = train.abstract_state(setup, config, rng)
    state = train.create_state(setup, init_fn, shardings, rng)
    step_fn, batch_sharding = train.compile_train_step(setup, shardings)
    losses = []
    for i in range(steps):
        state, metrics = step_fn(state, sharding.global_batch(batch, batch_sharding), jax.random.key(i))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


def synthetic_batch(config, seed=0):
    method = methods.build(config)
    rng = np.random.default_rng(seed)
    ids = method.sample(np.stack([masking.draw_noise(rng, method.layout) for _ in range(config.batch_size)]))
    images = rng.normal(size=(config.batch_size, 28, 28, 1)).astype(np.float32)
    return {"images": images, "ids_visible": ids.visible, "ids_decoded": ids.decoded, "ids_thrown": ids.thrown}


# Data parallel and FSDP reorder float32 sums (gradient all-reduce, sharded updates): agreement to 1e-5.
SHARDING_ATOL = 1e-5


@pytest.mark.parametrize(
    "mesh",
    [(("data", 8), ("fsdp", 1)), (("data", 1), ("fsdp", 8)), (("data", 2), ("fsdp", 4))],
    ids=["data_parallel", "fsdp", "data2_fsdp4"],
)
def test_sharded_steps_match_one_device(mesh):
    assert jax.device_count() == 8, "tests run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (conftest)"
    config = tiny_config()
    batch = synthetic_batch(config)
    one_losses, one_params, _ = run_steps(
        tiny_config(sharding=sharding.sharding_config(mesh=(("data", 1), ("fsdp", 1)))), jax.devices()[:1], batch
    )
    losses, params, state = run_steps(tiny_config(sharding=sharding.sharding_config(mesh=mesh)), jax.devices(), batch)
    np.testing.assert_allclose(losses, one_losses, rtol=0, atol=SHARDING_ATOL)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(one_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=SHARDING_ATOL)
    kernel = state.params["encoder"]["transformer"]["block_0"]["mlp"]["fc1"]["kernel"]
    fsdp = dict(mesh)["fsdp"]
    # FSDP shards parameters (and the optimizer state with them) along 'embed'.
    assert kernel.addressable_shards[0].data.shape == (32 // fsdp, 128)
    mu = state.opt_state[0].mu["encoder"]["transformer"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert mu.sharding == kernel.sharding


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.method.update(throw_ratio=0.8), "only masked tokens can be thrown"),
        (lambda c: c.model.update(patch_size=7), "kernel_size=7 does not fit the 4x4 token grid"),
        (lambda c: c.update(batch_size=12), "batch_size=12 must be divisible by the 8 devices"),
        (lambda c: c.sharding.update(mesh=(("data", 3), ("fsdp", -1))), "cannot tile 8 devices"),
        (lambda c: c.data.update(image_size=32), "make data.image_size/channels match model"),
        (lambda c: c.optimizer.update(warmup_steps=100), "warmup_steps=100 must lie in"),
        (lambda c: c.evals.knn.update(batch_size=50), "kNN batch_size=50 must be divisible by the 8 devices"),
    ],
)
def test_impossible_configs_fail_before_compiling_and_write_nothing(tmp_path, edit, message):
    config = tiny_config()
    edit(config)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# --- whole runs ----------------------------------------------------------------------------------


def test_fashion_mnist_run_saves_checkpoints_pictures_metrics_and_reports_knn(tmp_path):
    config = tiny_config(picture_every=3)
    config.evals.knn.every = 3
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 6 and 0.0 <= result["knn_accuracy"] <= 1.0
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert (tmp_path / "reconstruction.png").stat().st_size > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert [row["step"] for row in read_metrics(tmp_path) if "knn_accuracy" in row] == [3, 6]  # periodic, then final
    # Beside it, kNN on the raw pixels of the same images with the same k: what pretraining must beat. It does
    # not depend on the parameters, so every evaluation reports the same number (computed once).
    raw = [row["knn_raw_pixels_accuracy"] for row in read_metrics(tmp_path) if "knn_accuracy" in row]
    assert raw[0] == raw[1] == result["knn_raw_pixels_accuracy"] and 0.5 < raw[0] <= 1.0
    steps = [row["step"] for row in read_metrics(tmp_path) if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(
        np.isfinite(row["loss"]) and row["images_per_second"] > 0 for row in read_metrics(tmp_path) if "loss" in row
    )


def test_mock_tfds_pretraining_run(tmp_path):
    config = tiny_config(total_steps=2, checkpoint_every=2)
    config.data = schema.data_config(
        source="tfds", name="imagenet2012", image_size=28, channels=1, mean=(0.5,), std=(0.25,)
    )
    config.evals.knn.update(train_examples=16, test_examples=16, batch_size=8)
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 2 and np.isfinite(result["loss"])


def test_videomae_running_cell_decoder_trains_and_draws_its_picture(tmp_path):
    config = tiny_config(total_steps=2, checkpoint_every=2, picture_every=2)
    config.model.patch_size = 2  # a 14x14 grid: VideoMAE V2's 2x2 cell tiles even grids only
    config.method = methods.method_config(
        "partial", sampler="running_cell", throw_ratio=0.5, running_cell_decoder="videomae"
    )
    del config.evals["knn"]  # the picture is the evaluation that reads the decoded ids
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 2 and np.isfinite(result["loss"]) and result["loss"] > 0
    assert (tmp_path / "reconstruction.png").stat().st_size > 0


def test_stop_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = tiny_config(checkpoint_every=2)
    train.train_and_evaluate(straight, str(tmp_path / "straight"))
    chunked = tiny_config(checkpoint_every=2, stop_after=3)
    first = train.train_and_evaluate(chunked, str(tmp_path / "chunked"))
    assert first["stopped"] and first["step"] == 3
    second = train.train_and_evaluate(chunked, str(tmp_path / "chunked"))
    assert second["step"] == 6
    # Bit-exact: the resumed run sees the same batches (iterator state) from the same parameters.
    assert losses_by_step(tmp_path / "chunked") == losses_by_step(tmp_path / "straight")
    final = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()][-1]
    resumed = [json.loads(line) for line in (tmp_path / "chunked" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["knn_accuracy"] == resumed["knn_accuracy"]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(total_steps=12, checkpoint_every=2)
    train.train_and_evaluate(tiny_config(total_steps=12, checkpoint_every=2, stop_after=2), str(tmp_path))
    config.optimizer.update(base_lr=1e12)  # diverges at once
    with pytest.raises(train.NonFiniteLossError, match="last checkpoint stays the last good one"):
        train.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    resumed = train.train_and_evaluate(tiny_config(total_steps=12, checkpoint_every=2, stop_after=1), str(tmp_path))
    assert resumed["step"] == 3 and np.isfinite(resumed["loss"])


# --- multi-process -------------------------------------------------------------------------------

WORKER = """
import json, sys
from prmim_jax import distributed, train
distributed.initialize_distributed({address!r}, {processes}, {process_id}) if {processes} > 1 else None
sys.path.insert(0, {tests!r})
from test_train import tiny_config
config = tiny_config(total_steps=4, checkpoint_every=2, batch_size=8, picture_every=2)
config.sharding.mesh = (("data", 1), ("fsdp", -1))  # parameters sharded across the processes too
config.evals.knn.update(train_examples=40, test_examples=20, batch_size=20)
result = train.train_and_evaluate(config, {workdir!r})
print("RESULT", json.dumps(result))
"""


def run_processes(workdir, processes, devices_per_process):
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices_per_process))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER.format(
                    address=f"localhost:{port}",
                    processes=processes,
                    process_id=i,
                    tests=str(ROOT / "tests"),
                    workdir=str(workdir),
                ),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    return [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:]) for out in outputs]


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    start = time.time()
    two = run_processes(tmp_path / "two", processes=2, devices_per_process=2)
    one = run_processes(tmp_path / "one", processes=1, devices_per_process=4)
    assert two[0]["step"] == two[1]["step"] == one[0]["step"] == 4
    # Each process read its own half of every global batch; together they saw what one process saw.
    two_losses, one_losses = losses_by_step(tmp_path / "two"), losses_by_step(tmp_path / "one")
    assert two_losses.keys() == one_losses.keys()
    np.testing.assert_allclose(list(two_losses.values()), list(one_losses.values()), rtol=0, atol=SHARDING_ATOL)
    assert two[0]["knn_accuracy"] == pytest.approx(one[0]["knn_accuracy"], abs=0.051)  # one of 20 queries may flip
    assert (tmp_path / "two" / "reconstruction.png").exists()
    # Tools that read a run (load_run, pictures, fine-tuning init, robustness) read one saved by two
    # processes in this one process: they restore the state only, not the per-process iterator files.
    _, _, two_params, two_step = load_run(tmp_path / "two")
    _, _, one_params, _ = load_run(tmp_path / "one")
    assert two_step == 4
    for a, b in zip(jax.tree_util.tree_leaves(two_params), jax.tree_util.tree_leaves(one_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=SHARDING_ATOL)
    assert time.time() - start < 600


# --- pictures across checkpoints -----------------------------------------------------------------


def test_reconstruction_pictures_compare_checkpoints_on_the_same_visible_tokens(tmp_path):
    from prmim_jax.tools import pictures

    runs = []
    for name in ("mae", "prmim"):
        config = tiny_config(total_steps=2, checkpoint_every=2)
        config.method = methods.method_config(name, throw_ratio=0.0 if name == "mae" else 0.5)
        config.evals.knn.update(train_examples=40, test_examples=40)
        train.train_and_evaluate(config, str(tmp_path / name))
        runs.append(str(tmp_path / name))
    out = tmp_path / "fig7.png"
    pictures.main(["--workdirs", ",".join(runs), "--out", str(out), "--num_images", "4"])
    from PIL import Image

    image = np.asarray(Image.open(out))
    cell = 28 * 4  # 112 // 28: small images are upscaled
    # original, visible, then each run's reconstruction and its token map; the rows' labels on the left
    grid = image[:, -(4 * cell + 3 * 2) :]
    assert image.shape[0] == 6 * cell + 5 * 2 and image.shape[1] > grid.shape[1]
    rows = [grid[r * (cell + 2) : r * (cell + 2) + cell] for r in range(6)]
    orange, green = np.array([255, 140, 0]), np.array([26, 178, 51])
    # The reconstructions carry no marks; PR-MIM's token map shows thrown tokens (orange), MAE's none.
    assert not any(np.all(rows[r] == orange, axis=-1).any() for r in (2, 4))
    assert not np.all(rows[3] == orange, axis=-1).any() and np.all(rows[3] == green, axis=-1).any()
    assert np.all(rows[5] == orange, axis=-1).any()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load_run(tmp_path)


# --- other frameworks through the same trainer ---------------------------------------------------
