"""Fine-tuning starts from the released pretraining checkpoints of every framework (``interop.official``).

For each layout, random weights are written in it exactly (names, shapes, wrapping, prefixes, and the keys
its framework saves beside the encoder: decoders, tap norms, fusion layers, buffers) by the torch-free
writer. Then the layout is detected; the imported encoder computes what an independent implementation
computes (timm's ``VisionTransformer`` and ``Beit`` on CPU, renamed by this file's own tables), or, for the
Swin, whose reader ``test_swin_checkpoint`` and ``test_export`` hold to timm, gives the weights back exactly;
a tiny fine-tune config with ``init.checkpoint`` builds and loads every encoder parameter; and a file of
another framework, of no known layout or of other sizes stops in one line before anything compiles.
mmengine's ``'meta'`` and the trainers' ``'optimizer'`` entries are left out of the files: the reader takes
``'model'`` or ``'state_dict'`` and nothing else.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stand_ins
import torch
from test_finetune import tiny_finetune_config
from test_swin_finetune import tiny_swin_finetune_config

from prmim_jax import methods, runs, train
from prmim_jax.interop import export, official, swin_checkpoint, weight_files
from prmim_jax.methods import classify
from prmim_jax.models import relative_position, simmim, swin, vit

stand_ins.install("torchvision")  # see stand_ins: timm's ViT and BEiT never call it

WIDTH, DEPTH, HEADS, PATCH, IMAGE, CHANNELS = 16, 2, 2, 4, 16, 3  # the files: a 4x4 grid of tokens
TIMM_SIZES = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=0)
ATOL = 2e-5


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def timm():
    import timm  # installed for the tests (requirements-test-nodeps.txt): never skipped

    return timm


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with every parameter moved by N(0, 0.2): no LayerNorm left at 1, no bias, gamma or table at 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def images(size: int = IMAGE) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(2, size, size, CHANNELS)).astype(np.float32)


def theirs(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def like_vit(**fields) -> vit.Encoder:
    """A classifier's ViT encoder of the files' sizes (mean pooling: no final norm), on a 4x4 grid."""
    sizes = dict(patch_size=PATCH, image_size=(IMAGE, IMAGE), width=WIDTH, depth=DEPTH, num_heads=HEADS)
    return vit.Encoder(**(sizes | dict(mlp_dim=4 * WIDTH, learned_pos_embedding=True, final_norm=False) | fields))


def timm_vit(timm, seed: int, final_norm: bool = True) -> torch.nn.Module:
    """timm's ViT of the files' sizes; without a final norm, its tokens come out of the last block."""
    return randomized(
        # avg pooling: norm is the identity, and fc_norm (dropped from the file) pools
        timm.models.VisionTransformer(**TIMM_SIZES, global_pool="token" if final_norm else "avg"),
        seed,
    )


def written(tmp_path, state_dict: dict, name: str, key: str | None = "model") -> str:
    path = str(tmp_path / name)
    weight_files.write(state_dict, path, key=key)
    return path


# --- the files, each as its framework saves it ----------------------------------------------------------------


def mae_file(tmp_path, timm) -> tuple[str, torch.nn.Module]:
    """facebookresearch/mae's training checkpoint: ``{'model': encoder + decoder}``, timm's names."""
    reference = timm_vit(timm, seed=0)
    decoder = {
        "mask_token": np.zeros((1, 1, 8), np.float32),
        "decoder_pos_embed": np.zeros((1, 17, 8), np.float32),
        "decoder_embed.weight": np.zeros((8, WIDTH), np.float32),
        "decoder_blocks.0.norm1.weight": np.ones(8, np.float32),
        "decoder_norm.weight": np.ones(8, np.float32),
        "decoder_pred.weight": np.zeros((PATCH * PATCH * CHANNELS, 8), np.float32),
    }
    return written(tmp_path, numpy_state_dict(reference) | decoder, "mae.pth"), reference


def localmim_file(tmp_path, timm) -> tuple[str, torch.nn.Module]:
    """Haoqing-Wang/LocalMIM's: timm's names, the final norm as the last of four tap norms ``norm.{0..3}``, the
    levels' decoders and the frozen HOG layers beside them."""
    reference = timm_vit(timm, seed=1)
    state_dict = numpy_state_dict(reference)
    taps = {f"norm.{k}.{kind}": np.full(WIDTH, k, np.float32) for k in range(3) for kind in ("weight", "bias")}
    last = {f"norm.3.{kind}": state_dict.pop(f"norm.{kind}") for kind in ("weight", "bias")}
    extras = {
        "decoder.0.mask_token": np.zeros((1, 1, 8), np.float32),
        "decoder.3.blocks.0.norm1.weight": np.ones(8, np.float32),
        "decoder.3.pred.weight": np.zeros((27, 8, 1, 1), np.float32),
        "hog_enc.0.conv.weight": np.zeros((18, 1, 5, 5), np.float32),
    }
    return written(tmp_path, state_dict | taps | last | extras, "localmim.pth"), reference


def tec_release_file(tmp_path, timm) -> tuple[str, torch.nn.Module]:
    """sail-sg/TEC's release as its weight_convert.py saves it: a flat state dict, no norm, fc_norm or head."""
    reference = timm_vit(timm, seed=2, final_norm=False)
    state_dict = {k: v for k, v in numpy_state_dict(reference).items() if not k.startswith("fc_norm.")}
    return written(tmp_path, state_dict, "tec_vitb.pth", key=None), reference


def tec_training_file(tmp_path, timm) -> tuple[str, torch.nn.Module]:
    """TEC's training checkpoint: ``{'model'}`` with the input adaptor ``cls_token_mlp`` (timm's ``Mlp(D, 4D)``)
    and the final norm, beside the feature adaptor and decoders. The reference's cls token is the MLP's output."""
    reference = timm_vit(timm, seed=3)
    mlp = randomized(timm.layers.Mlp(WIDTH, 4 * WIDTH), seed=4)
    state_dict = numpy_state_dict(reference)
    state_dict |= {f"cls_token_mlp.{k}": v for k, v in numpy_state_dict(mlp).items()}
    with torch.no_grad():
        reference.cls_token.copy_(mlp(reference.cls_token))
    extras = {
        "encoder_adaptor.adap_before.weight": np.ones(WIDTH * DEPTH, np.float32),
        "forward_fea_decoder.decoder_embed.weight": np.zeros((8, WIDTH), np.float32),
        "forward_att_decoder.decoder_qk.weight": np.zeros((2 * WIDTH, 8), np.float32),
        "decoder_blocks.0.norm1.weight": np.ones(8, np.float32),
        "decoder_pos_embed": np.zeros((1, 17, 8), np.float32),
    }
    return written(tmp_path, state_dict | extras, "tec_checkpoint.pth"), reference


# timm's ViT names -> mmpretrain's (mmpretrain/models/backbones/vision_transformer.py, mmcv's FFN), in order.
MMPRETRAIN_NAMES = (
    (r"^norm\.", "ln1."),
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"^blocks\.", "layers."),
    (r"\.norm1\.", ".ln1."),
    (r"\.norm2\.", ".ln2."),
    (r"\.mlp\.fc1\.", ".ffn.layers.0.0."),
    (r"\.mlp\.fc2\.", ".ffn.layers.1."),
)


def mmpretrain_name(key: str) -> str:
    for pattern, name in MMPRETRAIN_NAMES:
        key = re.sub(pattern, name, key)
    return "backbone." + key


def mff_file(tmp_path, timm) -> tuple[str, torch.nn.Module]:
    """MFF's release (mmpretrain): mmengine's ``{'state_dict'}`` of ``backbone.*`` (with the fusion's projections
    and weights) and the decoder ``neck.*``."""
    reference = timm_vit(timm, seed=5)
    state_dict = {mmpretrain_name(k): v for k, v in numpy_state_dict(reference).items()}
    extras = {f"backbone.proj_layers.{k}.weight": np.zeros((WIDTH, WIDTH), np.float32) for k in range(2)}
    extras |= {
        "backbone.proj_weights": np.ones((3, 1, 1, 1), np.float32),
        "neck.mask_token": np.zeros((1, 1, 8), np.float32),
        "neck.decoder_blocks.0.ffn.layers.0.0.weight": np.zeros((32, 8), np.float32),
        "neck.ln1.weight": np.ones(8, np.float32),
        "neck.decoder_pred.weight": np.zeros((PATCH * PATCH * CHANNELS, 8), np.float32),
    }
    return written(tmp_path, state_dict | extras, "mff.pth", key="state_dict"), reference


def simmim_file(tmp_path, timm) -> tuple[str, torch.nn.Module]:
    """microsoft/SimMIM's ViT: ``{'model'}`` of ``encoder.*`` in BEiT's names (timm's ``Beit`` with one shared
    relative table, layer scale, no absolute table), its relative index buffer, mask token and 1x1 conv head."""
    reference = randomized(
        timm.models.Beit(
            **TIMM_SIZES,
            global_pool="",
            init_values=0.1,
            use_abs_pos_emb=False,
            use_rel_pos_bias=False,
            use_shared_rel_pos_bias=True,
        ),
        seed=6,
    )
    state_dict = {f"encoder.{k}": v for k, v in numpy_state_dict(reference).items()}
    grid = (IMAGE // PATCH,) * 2
    extras = {
        "encoder.mask_token": np.zeros((1, 1, WIDTH), np.float32),
        "encoder.rel_pos_bias.relative_position_index": relative_position.relative_position_index(grid).astype(
            np.int64
        ),
        "decoder.0.weight": np.zeros((PATCH * PATCH * CHANNELS, WIDTH, 1, 1), np.float32),
        "decoder.0.bias": np.zeros(PATCH * PATCH * CHANNELS, np.float32),
    }
    return written(tmp_path, state_dict | extras, "simmim_vit_base.pth"), reference


def greenmim_file(tmp_path) -> tuple[str, swin.SwinTransformer, dict]:
    """LayneH/GreenMIM's: ``{'model'}`` of the official Swin under ``encoder.`` (its buffers too) and the MAE-style
    decoder beside it; the Swin is ``test_swin_finetune``'s tiny one."""
    model = swin.build_swin(tiny_swin_finetune_config().model)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1))))["params"]
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    state_dict = {f"encoder.{k}": v for k, v in swin_checkpoint.to_state_dict(params, model, "official").items()}
    extras = {
        "mask_token": np.zeros((1, 1, 8), np.float32),
        "decoder_embed.weight": np.zeros((8, 32), np.float32),
        "decoder_pos_embed": np.zeros((1, 17, 8), np.float32),
        "decoder_blocks.0.norm1.weight": np.ones(8, np.float32),
        "decoder_norm.weight": np.ones(8, np.float32),
        "decoder_pred.weight": np.zeros((16, 8), np.float32),
    }
    return written(tmp_path, state_dict | extras, "greenmim_swin.pth"), model, params


VIT_FILES = {
    "mae": mae_file,
    "localmim": localmim_file,
    "tec": tec_release_file,
    "tec_training": tec_training_file,
    "mmpretrain_vit": mff_file,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, timm) -> dict:
    """``{name: (path, timm reference)}`` of every ViT file, and the SimMIM one."""
    tmp_path = tmp_path_factory.mktemp("official")
    return {name: make(tmp_path, timm) for name, make in VIT_FILES.items()} | {
        "simmim_vit": simmim_file(tmp_path, timm)
    }


# --- (a, b) detected, and read into an encoder that computes what timm computes -------------------------------


@pytest.mark.parametrize("name", list(VIT_FILES))
def test_each_vit_release_is_detected_and_computes_what_timm_computes(files, name):
    path, reference = files[name]
    assert official.detect_layout(weight_files.read(path, official.WRAPPER_KEYS)) == name.removesuffix("_training")
    pretrained, params = official.load(path, like_vit())
    assert pretrained.final_norm == (name != "tec")  # TEC's release has none; LocalMIM's is its last tap norm
    assert pretrained.cls_token_mlp == (name == "tec_training")
    ours = pretrained.apply({"params": params}, jnp.asarray(images()))
    np.testing.assert_allclose(np.asarray(ours), theirs(reference, images()), atol=ATOL)


def test_tec_input_adaptor_folds_into_a_classifier_without_it(files):
    """A classifier has no ``cls_token_mlp``: ``vit.Encoder.adapt_pretrained`` folds it into the cls token."""
    path, reference = files["tec_training"]
    like = like_vit(final_norm=True)  # a linear probe's encoder: the tokens after the final norm
    params = like.adapt_pretrained(*reversed(official.load(path, like)))
    assert "cls_token_mlp" not in params
    ours = like.apply({"params": params}, jnp.asarray(images()))
    np.testing.assert_allclose(np.asarray(ours), theirs(reference, images()), atol=ATOL)


def test_simmim_vit_is_detected_and_computes_what_timm_beit_computes(files):
    path, reference = files["simmim_vit"]
    assert official.detect_layout(weight_files.read(path)) == "simmim_vit"
    like = simmim.SimMIMEncoder(PATCH, (IMAGE, IMAGE), CHANNELS, WIDTH, DEPTH, HEADS, 4 * WIDTH)
    pretrained, params = official.load(path, like)
    assert pretrained.architecture == like.architecture  # layer scale, one shared table, no absolute table
    assert "mask_token" not in params
    ours = pretrained.apply({"params": params}, jnp.asarray(images()))
    np.testing.assert_allclose(np.asarray(ours), theirs(reference, images()), atol=ATOL)


def test_beit_layout_that_export_writes_reads_back_exactly(tmp_path, files):
    """The SimMIM table is read and written in one place (``hf_simmim``): export's BEiT file (the shared table
    copied into every block) is detected as SimMIM's and gives back the very parameters."""
    like = simmim.SimMIMEncoder(PATCH, (IMAGE, IMAGE), CHANNELS, WIDTH, DEPTH, HEADS, 4 * WIDTH)
    _, params = official.load(files["simmim_vit"][0], like)
    path = str(tmp_path / "beit.pth")
    export.write(export.convert(like, params, "timm"), path)
    assert official.detect_layout(weight_files.read(path)) == "simmim_vit"
    _, again = official.load(path, like)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_greenmim_swin_is_detected_and_read_exactly(tmp_path):
    path, model, params = greenmim_file(tmp_path)
    assert official.detect_layout(weight_files.read(path)) == "swin"
    pretrained, loaded = official.load(path, model)
    assert pretrained is model
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


# --- (c) a fine-tune config with init.checkpoint builds and loads every encoder parameter ----------------------


def pretrained_encoder(config) -> dict:
    """The encoder a fresh run of ``config`` starts from: the method built (the file checked), its random
    parameters replaced by ``Method.load_pretrained`` (every leaf of the classifier's encoder, shapes checked)."""
    method = methods.build(config)
    params = nn.unbox(method.init(jax.random.key(0), method.example_batch(1)).params)
    on_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loaded = method.load_pretrained(params, jax.tree.map(lambda _: on_device, params), runs.load)["encoder"]
    return jax.tree.map(np.asarray, loaded)


def finetune_config(path: str, layout: str = "auto", **model):
    """``test_finetune``'s tiny fine-tune with the files' ViT at 32 pixels (an 8x8 grid: the 4x4 tables resize)."""
    config = tiny_finetune_config()
    sizes = dict(width=WIDTH, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, image_size=32, channels=CHANNELS)
    config.model.update(sizes | model)
    config.init.update(checkpoint=path, checkpoint_layout=layout)
    return config


@pytest.mark.parametrize("name", list(VIT_FILES))
def test_a_vit_fine_tune_config_with_init_checkpoint_loads_every_encoder_parameter(files, name):
    path = files[name][0]
    loaded = pretrained_encoder(finetune_config(path))  # built, checked to have the classifier's shapes
    pretrained, imported = official.load(path, like_vit())
    imported = vit.fold_cls_token_mlp(imported)
    for key, value in jax.tree_util.tree_leaves_with_path(loaded):
        names = [k.key for k in key]
        expected = imported
        for k in names:
            expected = expected[k]
        if names == ["pos_embedding"]:
            expected = vit.interpolate_pos_embedding(jnp.asarray(expected), pretrained.grid, (8, 8))
        np.testing.assert_allclose(value, expected, atol=1e-6, err_msg="/".join(names))


def test_the_older_init_names_are_checkpoint_with_a_fixed_layout(files, tmp_path):
    config = finetune_config(None)
    config.init.mae_checkpoint = files["mae"][0]
    mae = pretrained_encoder(config)
    jax.tree.map(np.testing.assert_array_equal, mae, pretrained_encoder(finetune_config(files["mae"][0], "mae")))
    path, _, params = greenmim_file(tmp_path)
    config = tiny_swin_finetune_config()
    config.init.swin_checkpoint = path
    jax.tree.map(np.testing.assert_array_equal, pretrained_encoder(config), params)


def test_a_simmim_checkpoint_reaches_a_simmim_classifier_encoder_through_adapt_pretrained(files):
    """``classify.pretrained_encoder`` with a SimMIM encoder at 32 pixels: the shared table resized to its grid."""
    like = simmim.SimMIMEncoder(PATCH, (32, 32), CHANNELS, WIDTH, DEPTH, HEADS, 4 * WIDTH)
    loaded = classify.pretrained_encoder(finetune_config(files["simmim_vit"][0]), like, runs.load)
    fresh = nn.unbox(jax.eval_shape(like.init, jax.random.key(0), jnp.zeros((1, 32, 32, CHANNELS))))["params"]
    assert jax.tree.map(np.shape, loaded) == jax.tree.map(lambda s: s.shape, fresh)
    _, imported = official.load(files["simmim_vit"][0], like)
    np.testing.assert_array_equal(
        loaded["transformer"]["block_1"]["mlp"]["fc2"]["kernel"],
        imported["transformer"]["block_1"]["mlp"]["fc2"]["kernel"],
    )
    table = loaded["relative_position_bias"]
    np.testing.assert_array_equal(table[-3:], imported["relative_position_bias"][-3:])  # the cls rows are kept
    assert table.shape == (relative_position.relative_position_bias_size((8, 8)), HEADS)


def test_a_greenmim_checkpoint_fine_tunes_a_swin_classifier(tmp_path):
    path, _, params = greenmim_file(tmp_path)
    config = tiny_swin_finetune_config()
    config.init.checkpoint = path
    jax.tree.map(np.testing.assert_array_equal, pretrained_encoder(config), params)


# --- (d) bad input stops in one line before anything compiles ----------------------------------------------------


def refused(config, error=ValueError) -> str:
    with pytest.raises(error) as raised:
        methods.build(config)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_a_file_of_another_framework_says_what_it_holds_and_the_architecture_to_set(files, tmp_path):
    swin_path, _, _ = greenmim_file(tmp_path)
    message = refused(finetune_config(swin_path))
    assert "holds a Swin Transformer" in message and "model.architecture='swin'" in message
    message = refused(finetune_config(files["simmim_vit"][0]))
    assert "holds a SimMIM ViT (layer scale, shared relative position bias)" in message
    assert "model.architecture='simmim_vit'" in message
    config = tiny_swin_finetune_config()
    config.init.checkpoint = files["mae"][0]
    assert "model.architecture='vit'" in refused(config)


def test_a_file_of_no_known_layout_names_the_layouts(tmp_path):
    path = written(tmp_path, {"conv1.weight": np.zeros((4, 3, 3, 3), np.float32)}, "resnet.pth")
    message = refused(finetune_config(path))
    assert message.startswith(f"init.checkpoint={path}: the file's keys (['conv1.weight']")
    assert str(official.LAYOUTS) in message


@pytest.mark.parametrize(
    "name, model, expected",
    [
        (
            "mae",
            dict(width=32, num_heads=4),
            r"the file holds a ViT of width=16, .* the model has width=32, .*set the model's width",
        ),
        ("simmim_vit", {}, r"SimMIM ViT .* 'vit' encoder"),
        ("tec", dict(pool="cls"), r"without a final norm .* model.pool='avg'"),
        ("mmpretrain_vit", dict(depth=3), r"depth=2, .* the model has .*depth=3.*set the model's depth"),
        ("mae", dict(channels=1), r"channels=3, .* the model has .*channels=1"),
    ],
)
def test_a_file_of_other_sizes_or_readout_names_the_fix(files, name, model, expected):
    message = refused(finetune_config(files[name][0], **model))
    assert re.search(expected, message), message


def test_an_unknown_layout_name_and_a_missing_file_are_refused(files):
    message = refused(finetune_config(files["mae"][0], "beit"))
    assert message.startswith("init.checkpoint_layout='beit': checkpoint layout 'beit' is not one of (")
    assert "no file /nonexistent.pth" in refused(finetune_config("/nonexistent.pth"), FileNotFoundError)


def test_the_check_runs_before_anything_compiles(files, monkeypatch):
    def compiled(*args, **kwargs):
        raise AssertionError("compiled before the checkpoint was refused")

    monkeypatch.setattr(jax, "jit", compiled)
    with pytest.raises(ValueError, match="the model has width=32"):
        train.validate(finetune_config(files["mae"][0], width=32, num_heads=4))
