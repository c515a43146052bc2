"""Exports load into the libraries people fine-tune with and compute our encoder's features there.

Each encoder family (a ViT as MAE, partial, PR-MIM, LocalMIM, MFF and TEC leave it; a ViT
classifier with its head; SimMIM's ViT; a Swin as GreenMIM leaves it) gets random weights at tiny
shapes, is exported with ``interop.export``, and is loaded by the real library on CPU: timm and
transformers strictly (every key used, none missing), mmseg through its own ``init_weights`` with
``init_cfg=dict(type='Pretrained')`` after checking that the file holds exactly the backbone's keys.
Features agree to 2e-5. detectron2 does not install here: its ViTDet configs read the official
``mae_pretrain_vit_base.pth``, so the ``mae`` export of a ViT-B/16 is checked key for key and shape
for shape against that release's layout.
"""

import json
import os
import pathlib
import stat

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stand_ins
import torch
import transformers

from prmim_jax.interop import export, mae_checkpoint, weight_files
from prmim_jax.models import classifier, mae, simmim, swin, vit

ATOL = 2e-5
IMAGE = 16
CLASSES = 5

stand_ins.install("torchvision")  # see stand_ins: timm's ViT, BEiT and Swin never call it
stand_ins.install("mmcv.ops")  # see stand_ins: mmseg's MAE, BEiT, ViT and Swin backbones never call it


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


def randomized(params, seed: int = 0):
    """``params`` (unboxed) with every leaf moved by N(0, 0.2): LayerNorm scales near 1, nothing left at 0."""
    leaves, treedef = jax.tree_util.tree_flatten(nn.unbox(params))
    rng = np.random.default_rng(seed)
    moved = [np.asarray(x, np.float32) + 0.2 * rng.normal(size=np.shape(x)).astype(np.float32) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, moved)


def images(channels: int = 3, size: int = IMAGE, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(batch, size, size, channels)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def vit_encoder(**overrides) -> vit.Encoder:
    sizes = dict(patch_size=4, image_size=(IMAGE, IMAGE), width=16, depth=2, num_heads=2, mlp_dim=64)
    return vit.Encoder(**(sizes | overrides))


@pytest.fixture(scope="module")
def pretrained_vit():
    """``(vit.Encoder, params)`` as MAE, partial, PR-MIM, LocalMIM, MFF and TEC leave it: fixed sin-cos table."""
    encoder = vit_encoder()
    return encoder, randomized(encoder.init(jax.random.key(0), images())["params"])


@pytest.fixture(scope="module")
def vit_classifier():
    """``(Classifier, params)``: MAE's fine-tuning head (mean of patch tokens, ``fc_norm``, linear)."""
    model = classifier.Classifier(vit_encoder(learned_pos_embedding=True, final_norm=False), CLASSES, "avg")
    return model, randomized(model.init(jax.random.key(1), images())["params"], seed=1)


@pytest.fixture(scope="module")
def simmim_encoder():
    """SimMIM's ViT: layer scale, one relative position table shared by the blocks, no absolute table."""
    encoder = simmim.SimMIMEncoder(
        patch_size=4,
        image_size=(IMAGE, IMAGE),
        channels=3,
        width=16,
        depth=2,
        num_heads=2,
        mlp_dim=64,
        layer_scale_init=0.1,
    )
    return encoder, randomized(encoder.init(jax.random.key(2), images())["params"], seed=2)


# 16 x 16 then 8 x 8 tokens in windows of 4, shifted in both stages: mmseg's Swin shifts every second block
# whatever the grid, where the official one (and ours) stops shifting a stage whose grid fits in one window.
SWIN_IMAGE = 32


@pytest.fixture(scope="module")
def swin_encoder():
    """A two-stage Swin, window 4, shifted windows in both stages."""
    encoder = swin.SwinTransformer(
        (SWIN_IMAGE, SWIN_IMAGE), patch_size=2, width=8, depths=(2, 2), num_heads=(1, 2), window_size=4
    )
    return encoder, randomized(encoder.init(jax.random.key(3), images(size=SWIN_IMAGE))["params"], seed=3)


def ours(encoder, params, x) -> np.ndarray:
    """``[B, 1 + N, D]`` tokens of a ViT, or a Swin's final features ``[B, h, w, D]``."""
    out = encoder.apply({"params": params}, jnp.asarray(x))
    return np.asarray(out.features if isinstance(out, swin.SwinOutput) else out)


def written(tmp_path, converted: export.Export, name: str) -> str:
    path = str(tmp_path / name)
    export.write(converted, path)
    return path


# --- timm ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm():
    import timm  # installed by launch/setup_env.sh --test (requirements-test-nodeps.txt): never skipped

    return timm


def load_strictly(model: torch.nn.Module, path: str, key: str | None = "model") -> torch.nn.Module:
    state_dict = torch.load(path, weights_only=True)
    model.load_state_dict(state_dict[key] if key else state_dict, strict=True)
    return model.eval()


def test_pretrained_vit_loads_strictly_into_timm_vision_transformer(tmp_path, timm, pretrained_vit):
    encoder, params = pretrained_vit
    path = written(tmp_path, export.convert(encoder, params, "timm"), "vit.pth")
    model = timm.models.VisionTransformer(
        img_size=IMAGE, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=0, global_pool="token"
    )
    load_strictly(model, path)
    x = images()
    with torch.no_grad():
        theirs = model.forward_features(nchw(x)).numpy()
    np.testing.assert_allclose(theirs, ours(encoder, params, x), atol=ATOL)


def test_fine_tuned_vit_loads_into_timm_with_its_head_and_gives_our_logits(tmp_path, timm, vit_classifier):
    model, params = vit_classifier
    head = {k: params[k] for k in ("fc_norm", "head")}
    path = written(tmp_path, export.convert(model.encoder, params["encoder"], "mae", head), "finetuned.pth")
    reference = timm.models.VisionTransformer(
        img_size=IMAGE, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=CLASSES, global_pool="avg"
    )
    load_strictly(reference, path)
    x = images()
    with torch.no_grad():
        theirs = reference(nchw(x)).numpy()
    np.testing.assert_allclose(theirs, np.asarray(model.apply({"params": params}, jnp.asarray(x))), atol=ATOL)


def test_simmim_vit_loads_strictly_into_timm_beit(tmp_path, timm, simmim_encoder):
    encoder, params = simmim_encoder
    path = written(tmp_path, export.convert(encoder, params, "timm"), "simmim.pth")
    model = timm.models.Beit(
        img_size=IMAGE,
        patch_size=4,
        embed_dim=16,
        depth=2,
        num_heads=2,
        num_classes=0,
        global_pool="token",
        init_values=0.1,
        use_abs_pos_emb=False,
        use_rel_pos_bias=True,
    )
    load_strictly(model, path)
    x = images()
    with torch.no_grad():
        theirs = model.forward_features(nchw(x)).numpy()
    np.testing.assert_allclose(theirs, ours(encoder, params, x), atol=ATOL)


def test_swin_loads_into_timm_through_its_pretrained_file_path(tmp_path, timm, swin_encoder):
    encoder, params = swin_encoder
    path = written(tmp_path, export.convert(encoder, params, "timm"), "swin.pth")
    # The user's path: timm's pretrained loader reads the official layout through its checkpoint filter, strictly.
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=path),
        img_size=SWIN_IMAGE,
        patch_size=2,
        embed_dim=8,
        depths=(2, 2),
        num_heads=(1, 2),
        window_size=4,
        num_classes=0,
    ).eval()
    x = images(size=SWIN_IMAGE)
    with torch.no_grad():
        theirs = model.forward_features(nchw(x)).numpy()
    np.testing.assert_allclose(theirs, ours(encoder, params, x), atol=ATOL)


# --- transformers --------------------------------------------------------------------------------------------


def from_pretrained(cls, path: str, **kwargs):
    model, info = cls.from_pretrained(path, output_loading_info=True, attn_implementation="eager", **kwargs)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"} | {"errors": info.get("error_msgs")}
    assert not any(problems.values()), problems
    return model.eval()


def test_pretrained_vit_is_a_transformers_vit_model(tmp_path, pretrained_vit):
    encoder, params = pretrained_vit
    path = written(tmp_path, export.convert(encoder, params, "transformers"), "vit_hf")
    assert json.loads(pathlib.Path(path, "config.json").read_text())["model_type"] == "vit"
    model = from_pretrained(transformers.ViTModel, path, add_pooling_layer=False)
    x = images()
    with torch.no_grad():
        theirs = model(pixel_values=nchw(x)).last_hidden_state.numpy()
    np.testing.assert_allclose(theirs, ours(encoder, params, x), atol=ATOL)


def test_linear_probe_with_batchnorm_head_is_a_transformers_classifier(tmp_path):
    """``pool='cls'`` + MAE's BatchNorm head: the BatchNorm is folded into ``classifier``, logits unchanged."""
    model = classifier.Classifier(vit_encoder(learned_pos_embedding=True), CLASSES, "cls", "batchnorm_linear")
    variables = model.init(jax.random.key(4), images())
    params = randomized(variables["params"], seed=4)
    stats = {"mean": np.linspace(-1, 1, 16, dtype=np.float32), "var": np.linspace(0.5, 2, 16, dtype=np.float32)}
    head = {"head": params["head"], "head_norm": stats}
    path = written(tmp_path, export.convert(model.encoder, params["encoder"], "transformers", head), "probe_hf")
    reference = from_pretrained(transformers.ViTForImageClassification, path)
    x = images()
    with torch.no_grad():
        theirs = reference(pixel_values=nchw(x)).logits.numpy()
    expected = model.apply({"params": params, "batch_stats": {"head_norm": stats}}, jnp.asarray(x))
    np.testing.assert_allclose(theirs, np.asarray(expected), atol=ATOL)


def test_simmim_vit_is_a_transformers_beit_model(tmp_path, simmim_encoder):
    encoder, params = simmim_encoder
    path = written(tmp_path, export.convert(encoder, params, "transformers"), "beit_hf")
    model = from_pretrained(transformers.BeitModel, path, add_pooling_layer=False)
    x = images()
    with torch.no_grad():
        theirs = model(pixel_values=nchw(x)).last_hidden_state.numpy()
    np.testing.assert_allclose(theirs, ours(encoder, params, x), atol=ATOL)


def test_swin_is_a_transformers_swin_model(tmp_path, swin_encoder):
    encoder, params = swin_encoder
    path = written(tmp_path, export.convert(encoder, params, "transformers"), "swin_hf")
    model = from_pretrained(transformers.SwinModel, path, add_pooling_layer=False)
    x = images(size=SWIN_IMAGE)
    with torch.no_grad():
        theirs = model(pixel_values=nchw(x)).last_hidden_state.numpy()
    expected = ours(encoder, params, x)
    np.testing.assert_allclose(theirs, expected.reshape(expected.shape[0], -1, expected.shape[-1]), atol=ATOL)


# --- mmseg ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mmseg_backbones():
    from mmseg.models import backbones  # installed by launch/setup_env.sh --test: never skipped

    return backbones


# Buffers mmseg recomputes: its BEiT / MAE backbones pop these from any checkpoint before loading.
RECOMPUTED = ("relative_position_index",)


def load_as_mmseg_does(backbone_cls, path: str, **kwargs) -> torch.nn.Module:
    """The backbone, loaded by its own ``init_weights`` from ``init_cfg=dict(type='Pretrained')``, after checking
    that the file holds exactly its keys and shapes (mmseg itself loads non-strictly and would not tell)."""
    model = backbone_cls(init_cfg=dict(type="Pretrained", checkpoint=path), **kwargs)
    state_dict = torch.load(path, weights_only=True)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(RECOMPUTED)}
    assert {k: tuple(v.shape) for k, v in state_dict.items() if not k.endswith(RECOMPUTED)} == expected
    model.init_weights()
    model.eval()  # mmseg's BEiT overrides train() without returning the module
    return model


def last_map(model, x) -> np.ndarray:
    """The backbone's last output ``[B, C, h, w]`` as ``[B, h, w, C]``."""
    with torch.no_grad():
        return model(nchw(x))[-1].numpy().transpose(0, 2, 3, 1)


def grid_tokens(tokens: np.ndarray, side: int) -> np.ndarray:
    """``[B, 1 + N, D]`` -> the patch tokens as ``[B, side, side, D]``."""
    return tokens[:, 1:].reshape(tokens.shape[0], side, side, -1)


# norm_cfg: mmseg defaults to LayerNorm eps 1e-5; its MAE, BEiT and ViT configs set eps=1e-6, as ours.
VIT_SIZES = dict(
    img_size=(IMAGE, IMAGE), patch_size=4, embed_dims=16, num_layers=2, num_heads=2, norm_cfg=dict(type="LN", eps=1e-6)
)


def test_pretrained_vit_is_mmseg_mae_backbone(tmp_path, mmseg_backbones, pretrained_vit):
    encoder, params = pretrained_vit
    path = written(tmp_path, export.convert(encoder, params, "mmseg"), "vit_mmseg.pth")
    model = load_as_mmseg_does(mmseg_backbones.MAE, path, **VIT_SIZES, out_indices=(1,), final_norm=True)
    x = images()
    np.testing.assert_allclose(last_map(model, x), grid_tokens(ours(encoder, params, x), 4), atol=ATOL)


def test_fine_tuned_vit_is_mmseg_vision_transformer(tmp_path, mmseg_backbones, vit_classifier):
    model, params = vit_classifier
    head = {k: params[k] for k in ("fc_norm", "head")}
    path = written(tmp_path, export.convert(model.encoder, params["encoder"], "mmseg", head), "ft_mmseg.pth")
    backbone = load_as_mmseg_does(
        mmseg_backbones.VisionTransformer, path, **VIT_SIZES, out_indices=(1,), patch_bias=True, final_norm=False
    )
    x = images()
    expected = grid_tokens(ours(model.encoder, params["encoder"], x), 4)
    np.testing.assert_allclose(last_map(backbone, x), expected, atol=ATOL)


def test_simmim_vit_is_mmseg_beit_backbone(tmp_path, mmseg_backbones, simmim_encoder):
    encoder, params = simmim_encoder
    path = written(tmp_path, export.convert(encoder, params, "mmseg"), "simmim_mmseg.pth")
    model = load_as_mmseg_does(mmseg_backbones.BEiT, path, **VIT_SIZES, out_indices=(1,), final_norm=True)
    x = images()
    np.testing.assert_allclose(last_map(model, x), grid_tokens(ours(encoder, params, x), 4), atol=ATOL)


@pytest.mark.parametrize("fmt", ["mmseg", "mmdet"])
def test_swin_is_mm_swin_transformer(tmp_path, mmseg_backbones, swin_encoder, fmt):
    """mmseg's and mmdet's SwinTransformer share their keys (swin2mmseg.py, mmdet's swin_converter)."""
    encoder, params = swin_encoder
    path = written(tmp_path, export.convert(encoder, params, fmt), f"swin_{fmt}.pth")
    model = load_as_mmseg_does(
        mmseg_backbones.SwinTransformer,
        path,
        pretrain_img_size=SWIN_IMAGE,
        patch_size=2,
        embed_dims=8,
        depths=(2, 2),
        num_heads=(1, 2),
        window_size=4,
        strides=(2, 2),
        out_indices=(0, 1),
    )
    x = images(size=SWIN_IMAGE)
    np.testing.assert_allclose(last_map(model, x), ours(encoder, params, x), atol=ATOL)


# --- detectron2 / mmdet ViTDet: the official MAE release layout ----------------------------------------------


def test_vit_b16_mae_export_is_the_official_release_layout_key_for_key():
    """detectron2's ViTDet configs (``train.init_checkpoint``) and mmdet's ViTDet project read the released
    ``mae_pretrain_vit_base.pth``: ``{'model': encoder}`` with exactly its keys, order and shapes."""
    encoder = vit.Encoder(16, (224, 224), 768, 12, 12, 3072)
    shapes = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.unbox(shapes))
    for fmt in ("mae", "mmdet"):
        converted = export.convert(encoder, params, fmt)
        release = mae_checkpoint.expected_shapes(mae.build_mae(mae.model_config("B/16")), include_decoder=False)
        assert converted.wrapper == "model"
        assert [(k, v.shape) for k, v in converted.state_dict.items()] == list(release.items())


# --- the file itself -----------------------------------------------------------------------------------------


def test_pth_export_needs_no_torch_and_torch_reads_it_safely(tmp_path, monkeypatch, pretrained_vit):
    encoder, params = pretrained_vit
    path = tmp_path / "vit.pth"
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch now fails
    export.write(export.convert(encoder, params, "mae"), path)
    monkeypatch.undo()
    loaded = torch.load(path, weights_only=True)["model"]
    for key, value in weight_files.read(path).items():
        np.testing.assert_array_equal(loaded[key].numpy(), value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_exported_files_get_the_permissions_of_any_new_file(tmp_path, suffix):
    # A weight file is shared (a cluster's model folder, a colleague's job): owner-only would lock others out.
    path = tmp_path / f"weights{suffix}"
    mask = os.umask(0o027)
    try:
        weight_files.write({"w": np.zeros((2, 3), np.float32)}, path)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
