"""Import and export of official MAE checkpoints, and the weight-file formats under them."""

import argparse
import collections

import jax
import numpy as np
import pytest
import torch
from test_transformers_equivalence import ARCHS, hf_model, hf_to_official, our_model

from prmim_jax.interop import mae_checkpoint, weight_files


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_then_import_is_exact(tiny_mae, tiny_params):
    state_dict = mae_checkpoint.to_state_dict(tiny_params, tiny_mae)
    assert_trees_equal(
        mae_checkpoint.from_state_dict(state_dict, tiny_mae), jax.tree_util.tree_map(np.asarray, tiny_params)
    )


@pytest.mark.parametrize("arch", ARCHS[:2], ids=lambda a: a.name)
def test_export_has_exactly_the_official_keys_shapes_and_values(arch):
    official = hf_to_official(hf_model(arch, seed=3).state_dict())
    model = our_model(arch)
    exported = mae_checkpoint.to_state_dict(mae_checkpoint.from_state_dict(official, model), model)
    assert list(exported) == list(mae_checkpoint.expected_shapes(model))
    assert set(exported) == set(official)
    for key, value in official.items():
        assert exported[key].dtype == np.float32
        # Sin-cos tables are recomputed; every weight is carried bit for bit.
        if key.endswith("pos_embed"):
            np.testing.assert_allclose(exported[key], value, atol=1e-6)
        else:
            np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_file_round_trip_is_exact_and_loads_strictly_in_pytorch(tmp_path, tiny_mae, tiny_params, suffix):
    path = tmp_path / f"mae{suffix}"
    mae_checkpoint.save(tiny_params, tiny_mae, path)
    assert not list(tmp_path.glob("*.partial"))
    assert_trees_equal(mae_checkpoint.load(path, tiny_mae), jax.tree_util.tree_map(np.asarray, tiny_params))
    if suffix == ".pth":
        loaded = torch.load(path, weights_only=True)["model"]
        expected = mae_checkpoint.expected_shapes(tiny_mae)
        assert list(loaded) == list(expected)
        assert {k: tuple(v.shape) for k, v in loaded.items()} == expected


def test_encoder_only_checkpoint_imports_the_encoder(tmp_path, tiny_mae, tiny_params):
    path = tmp_path / "encoder.pth"
    mae_checkpoint.save(tiny_params, tiny_mae, path, include_decoder=False)
    assert not any(k.startswith("decoder") or k == "mask_token" for k in weight_files.read(path))
    imported = mae_checkpoint.load(path, tiny_mae)
    assert set(imported) == {"encoder"}
    fresh = jax.tree_util.tree_map(np.zeros_like, tiny_params)
    merged = mae_checkpoint.merge_into(fresh, imported)
    assert_trees_equal(merged["encoder"], jax.tree_util.tree_map(np.asarray, tiny_params["encoder"]))
    assert_trees_equal(merged["decoder"], fresh["decoder"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), "missing key 'blocks.1.mlp.fc2.bias'"),
        (lambda sd: sd.pop("decoder_norm.weight"), "missing key 'decoder_norm.weight'"),
        (lambda sd: sd.update(head_weight=np.zeros(3)), "unexpected key 'head_weight'"),
        (
            lambda sd: sd.update({"blocks.0.attn.qkv.weight": np.zeros((96, 16))}),
            r"key 'blocks.0.attn.qkv.weight' has shape \(96, 16\)",
        ),
        (lambda sd: sd.update(pos_embed=sd["pos_embed"] + 0.1), "key 'pos_embed' is not the fixed 2-D sin-cos table"),
    ],
)
def test_mismatched_state_dicts_name_the_key(tiny_mae, tiny_params, edit, message):
    state_dict = mae_checkpoint.to_state_dict(tiny_params, tiny_mae)
    edit(state_dict)
    with pytest.raises(mae_checkpoint.CheckpointMismatchError, match=message):
        mae_checkpoint.from_state_dict(state_dict, tiny_mae)


def test_reader_rebuilds_torch_tensors_without_torch(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = collections.OrderedDict(
        weight=base,
        transposed=base.t(),  # non-contiguous strides
        sliced=base[1:, 2:],  # storage offset
        half=base.half(),
        bf16=base.bfloat16(),
        index=torch.tensor([3, 1, 2]),
        scalar=torch.tensor(7.5),
    )
    path = tmp_path / "train.pth"
    # An official MAE training checkpoint also carries optimizer state, epoch and argparse args.
    torch.save({"model": tensors, "optimizer": {"state": {}}, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, path)
    read = weight_files.read(path)
    assert list(read) == list(tensors)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(read[name].astype(np.float64), tensor.double().numpy(), err_msg=name)
        assert read[name].shape == tuple(tensor.shape)


def test_reader_rejects_files_that_hold_no_state_dict(tmp_path):
    not_zip = tmp_path / "legacy.pth"
    not_zip.write_bytes(b"\x80\x02not a zip archive")
    with pytest.raises(weight_files.WeightFileError, match=r"not a torch\.save zip archive"):
        weight_files.read(not_zip)
    nested = tmp_path / "nested.pth"
    torch.save({"state": {"w": torch.zeros(2)}}, nested)
    with pytest.raises(weight_files.WeightFileError, match="holds no state dict under 'model'"):
        weight_files.read(nested)


def test_reader_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload()}, path)
    np.testing.assert_array_equal(weight_files.read(path)["w"], np.zeros(2, np.float32))
    assert not marker.exists()


def test_prmim_checkpoints_carry_the_aggregation_in_pytorch_conv_layout(tmp_path):
    import flax.linen as nn
    import jax.numpy as jnp
    from conftest import tiny_model_config

    from prmim_jax import masking, methods
    from prmim_jax.methods import mae as mae_family
    from prmim_jax.models import aggregate

    method = mae_family.from_sections(tiny_model_config(), methods.method_config("prmim"))
    model = method.model
    rng = np.random.default_rng(0)
    ids = method.sample(np.stack([masking.draw_noise(rng, method.layout) for _ in range(2)]))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), *ids))["params"]
    path = tmp_path / "prmim.pth"
    mae_checkpoint.save(params, model, path)
    assert_trees_equal(mae_checkpoint.load(path, model), jax.tree_util.tree_map(np.asarray, params))

    state_dict = torch.load(path, weights_only=True)["model"]
    conv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)  # the paper's depth-wise aggregation
    conv.load_state_dict(
        {"weight": state_dict["decoder_aggregation.weight"], "bias": state_dict["decoder_aggregation.bias"]}
    )
    grid = rng.normal(size=(2, 14, 14, 16)).astype(np.float32)
    with torch.no_grad():
        expected = conv(torch.from_numpy(grid.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    ours = aggregate.depthwise_conv(jnp.asarray(grid), params["aggregation"]["kernel"]) + params["aggregation"]["bias"]
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)
