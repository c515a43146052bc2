"""The discriminating reproduction (benchmarks/reproduce_fmnist.py), end to end where CI runs: the CPU.

One ``--plan smoke`` run through the GPU machine's entry point (``reproduce_fmnist.sh``)
covers every kind of row: MAE, PR-MIM (the aggregation's own parameters in the
gradient distance), AMT (the attention-map pass and the map-weighted draw) and
the classifier from scratch. The tests read its table; the host helpers are
checked on their own.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_once_per_session, xla_flags

from prmim_jax.data import transforms

ROOT = pathlib.Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("reproduce_fmnist", ROOT / "benchmarks" / "reproduce_fmnist.py")
reproduce = importlib.util.module_from_spec(spec)
sys.modules["reproduce_fmnist"] = reproduce  # its dataclasses look their module up
spec.loader.exec_module(reproduce)
ROWS = "mae,prmim_0.5,amt_0.4,scratch"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    def produce(out):
        environ = {key: value for key, value in os.environ.items() if key != "PYTHON"}
        # Compiled without XLA's optimisations: the run checks the code, not the speed.
        environ.update(XLA_FLAGS=xla_flags(1), JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_PLATFORMS="cpu")
        command = ["bash", "benchmarks/reproduce_fmnist.sh", "--plan", "smoke", "--rows", ROWS, "--workers", "2"]
        result = subprocess.run(
            [*command, str(out)], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    out = run_once_per_session(tmp_path_factory, "reproduce_smoke", produce)
    return out, json.loads((out / "reproduce_fmnist.json").read_text())


def test_every_row_measures_each_seed_and_the_table_pairs_it_with_mae(smoke):
    out, run = smoke
    seeds = run["plan"]["seeds"]
    assert list(run["results"]) == ROWS.split(",")
    for name, result in run["results"].items():
        assert len(result["finetune"]) == seeds and all(0 <= a <= 1 for a in result["finetune"])
        if name != "scratch":
            assert len(result["knn"]) == len(result["probe"]) == len(result["pretrain_loss"]) == seeds
            assert result["seconds_per_step"] > 0
    table = (out / "reproduce_fmnist.md").read_text()
    assert "| prmim_0.5 | 2 | prmim | furthest | 0.5 |" in table and "| amt_0.4 | 6 | partial | amt | 0.4 |" in table
    assert "+- " in table and "(2)" in table  # mean +- std over the 2 seeds
    assert (out / "reproduce_fmnist_table.png").stat().st_size > 0 and (out / "reproduce_fmnist_fig4.png").exists()


def test_rows_that_throw_trace_their_gradient_distance_to_mae_along_pretraining(smoke):
    _, run = smoke
    for name in ("prmim_0.5", "amt_0.4"):
        curve = run["results"][name]["graddiff"]
        assert [point["step"] for point in curve] == [8, 16]  # two points over 2 epochs of 8 steps
        assert all(len(point["relative_l2"]) == 2 and min(point["relative_l2"]) > 0 for point in curve)
    assert run["results"]["mae"]["graddiff"] == []


def test_amt_recomputes_its_attention_maps_on_schedule(smoke):
    # The smoke plan: warm-up 0, interval 1 epoch, 2 epochs of 8 steps: one pass, after step 8.
    _, run = smoke
    assert run["results"]["amt_0.4"]["amt_refreshes"] == [8]


def test_a_seed_draws_the_same_images_crops_and_token_noise_in_every_row():
    layout = type("Layout", (), {"num_tokens": 196})()
    task = ((0, 1), 3, 16, 64, (0.2, 1.0), "amt", layout)
    first, again = reproduce.host_batches(task), reproduce.host_batches(task)
    for key in ("index", "crop", "noise"):
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["index"][0], first["index"][1])  # seeds differ
    # Within an epoch every image comes once.
    epoch = np.concatenate([reproduce.host_batches(((0,), step, 16, 64, (0.2, 1.0), "amt", layout))["index"][0]
                            for step in range(4)])  # fmt: skip
    assert sorted(epoch) == list(range(64))


def test_crop_boxes_lie_inside_the_image_with_the_areas_and_flips_asked_for():
    boxes = reproduce.crop_boxes(np.random.default_rng(0), 20000, (0.2, 1.0))
    top, left, height, width, flip = boxes.T
    assert (
        (top >= 0).all() and (left >= 0).all() and (top + height <= 1 + 1e-6).all() and (left + width <= 1 + 1e-6).all()
    )
    area = height * width
    assert area.min() >= 0.2 - 1e-6 and abs(flip.mean() - 0.5) < 0.02
    # The pipeline's own rule (torchvision's) on a large image draws the same distribution of areas and aspects.
    rng = np.random.default_rng(1)
    pipeline = np.array([transforms.random_resized_crop_box(rng, 1000, 1000, (0.2, 1.0)) for _ in range(20000)])
    assert abs(area.mean() - (pipeline[:, 2] * pipeline[:, 3] / 1e6).mean()) < 0.01
    assert abs(np.log(width / height).std() - np.log(pipeline[:, 3] / pipeline[:, 2]).std()) < 0.01


def test_device_crop_of_the_whole_image_unflipped_is_the_image():
    import jax.numpy as jnp

    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    whole = np.tile(np.array([[0, 0, 1, 1, 0]], np.float32), (3, 1))
    np.testing.assert_array_equal(np.asarray(reproduce.augment(jnp.asarray(images), whole, 28)), images)
    mirrored = whole.copy()
    mirrored[:, 4] = 1
    np.testing.assert_array_equal(np.asarray(reproduce.augment(jnp.asarray(images), mirrored, 28)), images[:, :, ::-1])


def test_fine_tuning_starts_from_each_seeds_pretrained_encoder(tmp_path):
    # The classifier's encoder, loaded from a pretraining state stacked over seeds, computes what the pretrained
    # encoder of the same seed computes (the fixed sin-cos position table included).
    import argparse

    import jax

    plan = dict(reproduce.PLANS["smoke"], train_examples=16, test_examples=8)
    args = argparse.Namespace(data_dir=None)
    from prmim_jax.data import sources

    args.data_dir = sources.FASHION_MNIST_DIR
    experiment = reproduce.Experiment(args, plan, pool=None)
    row = reproduce.ROWS[0]
    method = experiment.method(row, total_steps=10)
    pretrained = reproduce.stacked_init(method, method.optimizer(8, 10), experiment.seeds, 8)
    module, _ = method.encoder()
    programs = experiment.classifier()
    classifier = programs["method"]
    state = experiment.with_encoder(programs["init"](), classifier, module, pretrained.params["encoder"])
    images = method.normalize(experiment.train_images[:4])
    outputs = []
    for seed in range(plan["seeds"]):
        seed_params = jax.tree.map(lambda x, seed=seed: x[seed], state.params["encoder"])
        ours = np.asarray(classifier.model.encoder.apply({"params": seed_params}, images))
        # Fine-tuning pools the tokens through its own fc_norm: compare before the encoder's final norm.
        theirs = module.clone(final_norm=False).apply(
            {"params": jax.tree.map(lambda x, seed=seed: x[seed], pretrained.params["encoder"])}, images
        )
        np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-5)
        outputs.append(ours)
    assert not np.allclose(outputs[0], outputs[1])  # each seed its own encoder
