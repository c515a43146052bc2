"""Fine-tuning, partial fine-tuning and linear probing: what loads, what trains, what stays frozen,
and that a short fine-tune of a pretrained encoder learns Fashion-MNIST."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import finetune_experiment, load_run
from test_train import tiny_config

from prmim_jax import loop, optim, sharding, train, train_step
from prmim_jax.data import pipeline, schema
from prmim_jax.methods import classify
from prmim_jax.models import classifier, vit
from prmim_jax.tools import robustness


def tiny_finetune_config(**overrides):
    """The encoder of ``test_train.tiny_config`` (width 32, one block, patch 4) as a 10-class classifier."""
    config = finetune_experiment()
    config.batch_size = 64
    config.total_steps = 4
    config.model = classifier.classifier_config(
        "Ti/4", width=32, depth=1, num_heads=4, image_size=28, channels=1, num_classes=10, drop_path_rate=0.1
    )
    config.optimizer = optim.classifier_optimizer_config(base_lr=4e-3, layer_decay=0.75, warmup_steps=1)
    config.mixing = classify.mixing_config(mixup_alpha=0.0, cutmix_alpha=0.0)
    config.data = schema.data_config(source="fashion_mnist", crop_scale=(0.35, 1.0))
    config.evals.accuracy.update(batch_size=400)
    config.log_every = 2
    config.checkpoint_every = 2
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain")
    train.train_and_evaluate(tiny_config(), str(workdir))
    return str(workdir)


def fresh_state(config, devices=None):
    setup = train.validate(config, devices)
    rng = jax.random.key(0)
    init_fn, _, shardings = train.abstract_state(setup, config, rng)
    return setup, shardings, train.create_state(setup, init_fn, shardings, rng)


def test_fresh_fine_tune_starts_from_the_pretrained_encoder(pretrained_workdir):
    config = tiny_finetune_config()
    config.init.workdir = pretrained_workdir
    _, _, state = fresh_state(config)
    *_, pretrained, _ = load_run(pretrained_workdir)
    loaded = jax.device_get(state.params["encoder"])
    for path, value in jax.tree_util.tree_leaves_with_path(loaded):
        if path[0].key != "pos_embedding":  # everything else is the pretrained value (the final norm is unused)
            np.testing.assert_array_equal(value, _at(pretrained["encoder"], path))
    np.testing.assert_allclose(loaded["pos_embedding"], vit.sincos_2d(32, (7, 7)), atol=1e-7)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_position_table_is_interpolated_to_a_new_resolution(pretrained_workdir):
    config = tiny_finetune_config()
    config.init.workdir = pretrained_workdir
    config.model.image_size = config.data.image_size = 56  # 14 x 14 tokens from a 7 x 7 pretraining
    _, _, state = fresh_state(config)
    table = jax.device_get(state.params["encoder"]["pos_embedding"])
    assert table.shape == (1 + 14 * 14, 32)
    np.testing.assert_array_equal(table[0], 0.0)  # the cls row is kept
    # A constant table stays constant; a table resized to its own grid is unchanged.
    constant = jnp.ones((1 + 49, 8))
    np.testing.assert_allclose(vit.interpolate_pos_embedding(constant, (7, 7), (14, 14)), 1.0, atol=1e-6)
    same = jnp.asarray(vit.sincos_2d(8, (7, 7)))
    np.testing.assert_array_equal(vit.interpolate_pos_embedding(same, (7, 7), (7, 7)), same)


def test_mismatched_pretrained_encoder_fails_before_compiling(pretrained_workdir):
    config = tiny_finetune_config()
    config.init.workdir = pretrained_workdir
    config.model.width = 64
    with pytest.raises(ValueError, match=r"make model's variant and sizes match the pretraining run's"):
        train.validate(config)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.model.update(trainable_blocks=3), r"trainable_blocks=3 must lie in \[0, depth=1\]"),
        (lambda c: c.model.update(pool="max"), "pool='max'"),
        (lambda c: c.optimizer.update(name="sgd"), "optimizer.name='sgd'"),
        (lambda c: c.mixing.update(prob=1.5), "probabilities must lie in"),
        (lambda c: c.init.update(workdir="/nonexistent", mae_checkpoint="x.pth"), "not both"),
        (lambda c: c.init.update(workdir="/nonexistent"), "point it at a prmim_jax pretraining workdir"),
        (lambda c: c.update(batch_size=60), "batch_size=60 must be divisible by the 8 devices"),
    ],
)
def test_bad_fine_tuning_configs_fail_with_the_fix(edit, message):
    config = tiny_finetune_config()
    edit(config)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.validate(config)


def run_steps(config, steps=2):
    setup, shardings, state = fresh_state(config)
    initial = jax.device_get(state.params)
    initial_stats = jax.device_get(state.batch_stats)
    step_fn, batch_sharding = loop.jit_step(
        lambda s, b, r: train_step.train_step(s, b, r, method=setup.method), setup.placement, shardings
    )
    rng = np.random.default_rng(0)
    for i in range(steps):
        batch = {
            "images": rng.normal(size=(config.batch_size, 28, 28, 1)).astype(np.float32),
            "labels": rng.integers(0, 10, size=config.batch_size).astype(np.int32),
        }
        state, _ = step_fn(state, sharding.global_batch(batch, batch_sharding), jax.random.key(i))
    return initial, initial_stats, jax.device_get(state)


def changed(before, after) -> dict[str, bool]:
    flat_before = dict(jax.tree_util.tree_leaves_with_path(before))
    return {
        jax.tree_util.keystr(path): not np.array_equal(flat_before[path], value)
        for path, value in jax.tree_util.tree_leaves_with_path(after)
    }


def test_partial_fine_tuning_updates_only_the_last_blocks_and_head():
    config = tiny_finetune_config()
    config.model.update(depth=2, trainable_blocks=1)
    initial, _, state = run_steps(config)
    moved = changed(initial, state.params)
    for name, did_move in moved.items():
        trains = "block_1" in name or "fc_norm" in name or "head" in name or "'norm'" in name
        assert did_move == trains, name  # frozen ones are bit-identical: no update, no weight decay


def test_linear_probe_trains_the_head_only_and_tracks_batch_statistics():
    config = tiny_finetune_config()
    config.model.update(pool="cls", head="batchnorm_linear", head_init_std=0.01, trainable_blocks=0)
    config.optimizer.update(name="lars", base_lr=0.1, weight_decay=0.0, layer_decay=1.0)
    initial, initial_stats, state = run_steps(config)
    moved = changed(initial, state.params)
    assert {name for name, m in moved.items() if m} == {"['head']['bias']", "['head']['kernel']"}
    assert all(changed(initial_stats, state.batch_stats).values())
    assert set(state.batch_stats["head_norm"]) == {"mean", "var"}  # BatchNorm without affine parameters


def test_layer_wise_lr_decay_scales_updates_by_depth():
    params = {
        "encoder": {
            "patch_embed": {"kernel": jnp.ones(2)},
            "transformer": {
                "block_0": {"w": jnp.ones(2)},
                "block_1": {"w": jnp.ones(2)},
                "norm": {"scale": jnp.ones(2)},
            },
        },
        "head": {"kernel": jnp.ones(2)},
    }
    scaled, _ = optim.scale_by_layer(0.5, depth=2).update(params, optax.EmptyState())
    assert float(scaled["encoder"]["patch_embed"]["kernel"][0]) == 0.5**3
    assert float(scaled["encoder"]["transformer"]["block_0"]["w"][0]) == 0.5**2
    assert float(scaled["encoder"]["transformer"]["block_1"]["w"][0]) == 0.5
    assert float(scaled["encoder"]["transformer"]["norm"]["scale"][0]) == 1.0
    assert float(scaled["head"]["kernel"][0]) == 1.0


def test_drop_path_is_off_at_inference_and_drawn_from_the_rng_in_training():
    config = tiny_finetune_config()
    config.model.update(depth=2, drop_path_rate=0.5, head_init_std=0.5)  # block 0 never drops (MAE's linear rule)
    model = classifier.build_classifier(config.model)
    no_drop = classifier.build_classifier(ml_collections.ConfigDict(config.model.to_dict() | {"drop_path_rate": 0.0}))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(16, 28, 28, 1)), jnp.float32)
    params = no_drop.init(jax.random.key(0), images)["params"]
    np.testing.assert_array_equal(model.apply({"params": params}, images), no_drop.apply({"params": params}, images))
    train_a = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(train_a, train_b)  # reproducible from the rng
    train_c = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train_a, no_drop.apply({"params": params}, images))
    assert not np.allclose(train_a, train_c)


def test_short_fine_tune_of_a_pretrained_encoder_learns_fashion_mnist(pretrained_workdir, tmp_path):
    config = tiny_finetune_config(total_steps=100, checkpoint_every=50, log_every=50)
    config.init.workdir = pretrained_workdir
    config.optimizer.base_lr = 4e-2
    config.data.crop_scale = (0.8, 1.0)
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 100
    assert result["accuracy"] > 0.4, result  # chance is 0.1; 0.55 when written
    predict, data = robustness.load_classifier(tmp_path)
    data.num_workers = 0
    batch = next(iter(pipeline.eval_dataset(data, batch_size=400)))
    accuracy = np.mean(np.argmax(predict(batch["images"]), -1) == batch["labels"])
    assert accuracy > 0.4


def test_interrupted_fine_tune_resumes_exactly(tmp_path):
    def config(**overrides):
        # Mixing, drop path and the augmentations draw randomness: a resumed run must draw the same.
        config = tiny_finetune_config(total_steps=4, **overrides)
        config.mixing.update(mixup_alpha=0.8, cutmix_alpha=1.0)
        config.data.update(rand_augment="rand-m9-mstd0.5-inc1", random_erase_prob=0.25)
        return config

    whole = train.train_and_evaluate(config(), str(tmp_path / "whole"))
    stopped = train.train_and_evaluate(config(stop_after=2), str(tmp_path / "split"))
    assert stopped["stopped"] and stopped["step"] == 2
    resumed = train.train_and_evaluate(config(), str(tmp_path / "split"))
    assert resumed["step"] == 4
    assert resumed["accuracy"] == whole["accuracy"] and resumed["loss"] == whole["loss"]


def test_main_runs_fine_tuning_configs_with_the_encoder_named_on_the_command_line(pretrained_workdir, tmp_path):
    config_file = tmp_path / "tiny_finetune.py"
    config_file.write_text(
        f"import sys\nsys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
        "from test_finetune import tiny_finetune_config\n\n\n"
        "def get_config():\n    return tiny_finetune_config(total_steps=2)\n"
    )
    workdir = tmp_path / "ft"
    command = [sys.executable, "-m", "prmim_jax.main", f"--config={config_file}", f"--workdir={workdir}"]
    completed = subprocess.run(
        [*command, f"--config.init.workdir={pretrained_workdir}"],
        cwd=pathlib.Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "final top-1 accuracy (test)" in completed.stdout
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["method"]["name"] == "classify" and saved["init"]["workdir"] == pretrained_workdir
