"""Swin checkpoints in the official and timm layouts: export then import gives our parameters back bit for bit,
either layout is recognised from its keys, tables of another window are resized, and a checkpoint of another
architecture is refused naming the keys and the fix."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prmim_jax.interop import swin_checkpoint
from prmim_jax.models import swin


def tiny_swin(window_size=4, num_classes=0, depths=(2, 2)) -> swin.SwinTransformer:
    """A 32x32 RGB Swin: stage 0 on 8x8 tokens (window 4, shift 2), stage 1 on 4x4 (one window)."""
    config = swin.model_config(
        "T", image_size=32, window_size=window_size, width=8, depths=depths, num_heads=(1, 2), drop_path_rate=0.0
    )
    return swin.build_swin(config, num_classes=num_classes)


def random_params(model: swin.SwinTransformer, seed: int = 0) -> dict:
    """Parameters of ``model``'s shapes (no compilation: shapes from ``eval_shape``), every value distinct."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *model.image_size, model.channels)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), nn.unbox(shapes)["params"])


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "layout, suffix", [("official", ".pth"), ("timm", ".safetensors"), ("official", ".safetensors")]
)
def test_export_then_import_gives_the_same_parameters(layout, suffix, tmp_path):
    model = tiny_swin(num_classes=5)
    params = random_params(model)
    swin_checkpoint.save(params, model, tmp_path / f"swin{suffix}", layout=layout)
    assert_same_tree(swin_checkpoint.load(tmp_path / f"swin{suffix}", model), params)


def test_official_export_has_the_official_keys_and_buffers():
    model = tiny_swin(num_classes=5)
    state_dict = swin_checkpoint.to_state_dict(random_params(model), model)
    buffers = {k for k in state_dict if k.endswith(swin_checkpoint.BUFFER_SUFFIXES)}
    assert set(state_dict) - buffers == set(swin_checkpoint.expected_shapes(model))
    assert "layers.0.downsample.reduction.weight" in state_dict and "head.weight" in state_dict
    assert {k for k in buffers if k.endswith("attn_mask")} == {"layers.0.blocks.1.attn_mask"}  # the shifted block
    assert state_dict["layers.1.blocks.0.attn.relative_position_index"].dtype == np.int64
    for key, shape in swin_checkpoint.expected_shapes(model).items():
        assert state_dict[key].shape == shape and state_dict[key].dtype == np.float32, key


def official_to_timm(state_dict: dict) -> dict:
    """timm's renaming of an official checkpoint (its checkpoint filter): merging moves to the next stage, the
    head becomes ``head.fc``, the buffers are not kept."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if key.startswith("layers.") and ".downsample." in key:
            stage = int(key.split(".")[1])
            key = f"layers.{stage + 1}.{key.split('.', 2)[2]}"
        out[key.replace("head.", "head.fc.")] = value
    return out


def test_a_timm_checkpoint_is_recognised_and_reads_as_the_official_one():
    model = tiny_swin(num_classes=5)
    official = swin_checkpoint.to_state_dict(random_params(model), model)
    timm = official_to_timm(official)
    assert "layers.1.downsample.reduction.weight" in timm and "head.fc.weight" in timm
    assert swin_checkpoint.detect_layout(official, 2) == "official"
    assert swin_checkpoint.detect_layout(timm, 2) == "timm"
    assert_same_tree(swin_checkpoint.from_state_dict(timm, model), swin_checkpoint.from_state_dict(official, model))
    assert_same_tree(swin_checkpoint.to_state_dict(swin_checkpoint.from_state_dict(timm, model), model, "timm"), timm)


def test_a_backbone_skips_the_head_and_a_pretraining_checkpoint_reads_through_its_encoder():
    classifier_model, backbone = tiny_swin(num_classes=5), tiny_swin()
    params = random_params(classifier_model)
    state_dict = swin_checkpoint.to_state_dict(params, classifier_model)
    expected = {k: v for k, v in params.items() if k != "head"}
    assert_same_tree(swin_checkpoint.from_state_dict(state_dict, backbone), expected)
    # SimMIM-style: the Swin under encoder., with a mask token and a decoder beside it.
    pretraining = {f"encoder.{k}": v for k, v in state_dict.items() if not k.startswith("head.")}
    pretraining |= {"encoder.mask_token": np.zeros((1, 1, 8)), "decoder.0.weight": np.zeros((48, 16, 1, 1))}
    assert_same_tree(swin_checkpoint.from_state_dict(pretraining, backbone), expected)


def test_tables_of_another_window_are_resized_on_import():
    small, large = tiny_swin(window_size=2), tiny_swin(window_size=4)
    params = swin_checkpoint.from_state_dict(swin_checkpoint.to_state_dict(random_params(small), small), large)
    tables = [
        params[f"stage_{s}"][f"block_{j}"]["attn"]["relative_position_bias_table"] for s in (0, 1) for j in (0, 1)
    ]
    assert [t.shape for t in tables] == [(49, 1), (49, 1), (49, 2), (49, 2)]  # 3x3 offsets -> 7x7
    assert_same_tree(params["stage_0"]["block_0"]["mlp"], random_params(small)["stage_0"]["block_0"]["mlp"])


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys_and_the_fix():
    state_dict = swin_checkpoint.to_state_dict(random_params(tiny_swin()), tiny_swin())
    deeper = tiny_swin(depths=(2, 4))
    with pytest.raises(
        ValueError, match=r"missing key 'layers.1.blocks.2.norm1.weight'.*depths=\(2, 2\).*depths=\(2, 4\)"
    ):
        swin_checkpoint.from_state_dict(state_dict, deeper)
    with pytest.raises(ValueError, match=r"missing key 'head.weight'.*set the model's .* num_classes"):
        swin_checkpoint.from_state_dict(state_dict, tiny_swin(num_classes=5))
    with pytest.raises(ValueError, match=r"unexpected key 'layers.0.blocks.0.attn.extra'"):
        swin_checkpoint.from_state_dict(state_dict | {"layers.0.blocks.0.attn.extra": np.zeros(2)}, tiny_swin())
