"""Fine-tuning a Swin through the one trainer and the classify method: a run trains and evaluates end to end, a
later run starts from it (or from a Swin checkpoint file) at another window with its tables resized, and
learning rates decay by the official Swin layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_run
from PIL import Image
from test_config_validation import load_config
from test_finetune import tiny_finetune_config

from prmim_jax import methods, runs, train
from prmim_jax.data import schema
from prmim_jax.interop import swin_checkpoint
from prmim_jax.methods import classify
from prmim_jax.models import swin


def tiny_swin_finetune_config(**overrides):
    """``test_finetune``'s tiny fine-tune with ``configs/finetune_swin_fmnist.py``'s Swin shrunk to 16x16 crops: patch
    4 gives a 4x4 grid of 2x2 windows (shifted by 1 in block 1), merged to 2x2 tokens at width 32 (one window)."""
    config = tiny_finetune_config(**overrides)
    config.model = load_config("finetune_swin_fmnist").model
    config.model.update(width=16, depths=(2, 1), num_heads=(1, 2), patch_size=4, window_size=2, image_size=16)
    config.data.image_size = 16
    return config


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory):
    """A 2-step Swin fine-tune evaluated at the end, on a 16-image folder (so the final evaluation is cheap)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "train" / label).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, size=(20, 20), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / label / f"{i}.png")
    config = tiny_swin_finetune_config(batch_size=8, total_steps=2, checkpoint_every=2)
    config.data = schema.data_config(
        source="image_folder", path=str(root), eval_split="train", image_size=16, channels=1, mean=(0.5,), std=(0.25,)
    )
    config.evals.accuracy.batch_size = 16
    workdir = tmp_path_factory.mktemp("swin_ft")
    return str(workdir), train.train_and_evaluate(config, str(workdir))


def test_a_swin_fine_tunes_and_is_evaluated_through_the_one_trainer(swin_run):
    workdir, result = swin_run
    assert result["step"] == 2 and np.isfinite(result["loss"]) and 0.0 <= result["accuracy"] <= 1.0
    config, method, params, step = load_run(workdir)
    assert step == 2 and config.model.architecture == "swin"
    assert isinstance(method.model.encoder, swin.SwinTransformer) and set(params) == {"encoder", "head"}


def pretrained_encoder(config):
    """What a fresh run of ``config`` starts its encoder from, checked to fit the classifier's encoder."""
    method = methods.build(config)
    encoder = classify.pretrained_encoder(method.config, method.model.encoder, runs.load)
    fresh = nn.unbox(jax.eval_shape(lambda: method.init(jax.random.key(0), method.example_batch(1)).params))
    assert jax.tree.map(np.shape, encoder) == jax.tree.map(lambda s: s.shape, fresh["encoder"])
    return encoder


def test_a_run_starts_from_a_swin_workdir_at_another_window_with_resized_tables(swin_run):
    workdir, _ = swin_run
    *_, trained, _ = load_run(workdir)
    config = tiny_swin_finetune_config()
    config.init.workdir = workdir
    config.model.window_size = 4  # stage 0: one 4x4 window (7x7 offsets); stage 1 stays one 2x2 window
    loaded, before = pretrained_encoder(config), trained["encoder"]
    table = loaded["stage_0"]["block_0"]["attn"]["relative_position_bias_table"]
    old_table = before["stage_0"]["block_0"]["attn"]["relative_position_bias_table"]
    assert (old_table.shape, table.shape) == ((3 * 3, 1), (7 * 7, 1))
    np.testing.assert_allclose(table, swin.resize_relative_position_table(old_table, (4, 4)))
    before = leaves(before)
    for name, value in leaves(loaded).items():
        if "stage_0" not in name or "relative_position" not in name:
            np.testing.assert_array_equal(value, before[name], err_msg=name)


def leaves(tree) -> dict:
    """``{'[key][key]...': leaf}`` of a pytree."""
    return {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_leaves_with_path(tree)}


def test_a_swin_checkpoint_file_initialises_the_encoder_but_not_the_head(tmp_path):
    config = tiny_swin_finetune_config()
    pretrained = swin.build_swin(config.model, num_classes=1000)  # an ImageNet classifier's checkpoint
    rng = np.random.default_rng(0)
    shapes = nn.unbox(jax.eval_shape(pretrained.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1))))["params"]
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    swin_checkpoint.save(params, pretrained, tmp_path / "swin.safetensors", layout="timm")
    config.init.swin_checkpoint = str(tmp_path / "swin.safetensors")
    loaded = pretrained_encoder(config)
    assert "head" not in loaded  # the classifier keeps its own head
    expected = leaves(params)
    for name, value in leaves(loaded).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_the_classify_method_decays_learning_rates_by_swin_layer():
    method = methods.build(tiny_swin_finetune_config())
    shapes = nn.unbox(jax.eval_shape(lambda: method.init(jax.random.key(0), method.example_batch(1)).params))
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    tx = method.optimizer(256, 100)  # warmup 1 step: the second update has a learning rate
    grads = jax.tree.map(np.ones_like, params)
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(2):
        updates, state = update(grads, state, params)
    decay = method.config.optimizer.layer_decay

    def ratio(update):  # Adam's first steps move every parameter by the learning rate alone
        return float(np.abs(update).max() / np.abs(updates["head"]["bias"]).max())

    encoder = updates["encoder"]
    assert ratio(encoder["patch_embed"]["kernel"]) == pytest.approx(decay**4, rel=1e-4)  # 3 blocks: head is layer 4
    assert ratio(encoder["stage_0"]["downsample"]["reduction"]["kernel"]) == pytest.approx(decay**2, rel=1e-4)
    assert ratio(encoder["stage_1"]["block_0"]["mlp"]["fc1"]["kernel"]) == pytest.approx(decay, rel=1e-4)


def test_fsdp_shards_swin_parameters_along_their_width_as_the_vits():
    config = tiny_swin_finetune_config()
    config.sharding.mesh = (("data", 1), ("fsdp", -1))
    setup = train.validate(config)
    _, _, shardings = train.abstract_state(setup, config, jax.random.key(0))  # shapes only: nothing compiles
    specs = {name: tuple(s.spec) for name, s in leaves(shardings.params["encoder"]).items()}
    assert specs["['stage_0']['block_1']['mlp']['fc1']['kernel']"] == ("fsdp", None)
    assert specs["['stage_1']['block_0']['attn']['query']['kernel']"] == ("fsdp", None, None)
    assert specs["['stage_0']['downsample']['reduction']['kernel']"] == ("fsdp", None)  # the 4C input side
    assert specs["['patch_embed']['kernel']"] == (None, "fsdp")
    assert specs["['stage_0']['block_0']['attn']['relative_position_bias_table']"] in ((), (None, None))
