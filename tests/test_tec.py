"""TEC: the teacher's targets, the student's loss, PR-MIM's switch, and one run of the trainer.

References are independent implementations on random weights (PyTorch, CPU):

- the teacher is transformers' ``ViTModel`` (a plain ViT with a learned
  position table, DeiT's / DINO's / iBOT's architecture), its weights saved in
  the timm layout the official releases use and read back by our importer; its
  targets are computed from its ``hidden_states`` and the last block's
  attention probabilities (whose logarithms are the logits up to a constant per
  row, which neither the top-k ranking nor a softmax over keys sees);
- the student's encoder is transformers' ``ViTMAEModel`` with the input
  adaptor's output as its cls token, its decoder blocks are transformers'
  ``ViTMAELayer``; the feature adaptor, the two decoders' inputs and heads and
  both losses are written out in PyTorch from the official description.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from test_transformers_equivalence import Arch, hf_model, hf_to_official

from prmim_jax import masking, methods, optim, runs
from prmim_jax.data import schema
from prmim_jax.interop import mae_checkpoint, vit_checkpoint, weight_files
from prmim_jax.methods import mae, tec
from prmim_jax.models import layers
from prmim_jax.models import tec as tec_lib

ATOL = 2e-5
ARCH = Arch("gray_28px_patch2_depth4", 28, 2, 1, 32, 4, 4, 32, 1, 4)
TOP_K = 5
TEMPERATURE = 1.8  # the MAE-teacher recipe's; the iBOT recipe's 1.0 would not exercise it
DEFAULT_SECTIONS = dict(optimizer=optim.optimizer_config(), data=schema.data_config())


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


def model_section(arch: Arch = ARCH, **overrides):
    keys = dict(
        width=arch.width,
        depth=arch.depth,
        num_heads=arch.heads,
        patch_size=arch.patch_size,
        image_size=arch.image_size,
        channels=arch.channels,
        decoder_width=arch.decoder_width,
        decoder_depth=arch.decoder_depth,
        decoder_num_heads=arch.decoder_heads,
        adaptor_groups=2,
    )
    return tec_lib.model_config("B/16", **(keys | overrides))


def tec_method(reconstruction="full", model=None, **overrides):
    """The TEC method on ``model`` (``ARCH``'s by default); its teacher file is only named (tests load their own)."""
    keys = dict(attention_top_k=TOP_K, attention_temperature=TEMPERATURE, teacher=dict(checkpoint="unread.pth"))
    section = tec.default_config(reconstruction=reconstruction, **(keys | overrides))
    return methods.build(
        ml_collections.ConfigDict(dict(model=model or model_section(), method=section) | DEFAULT_SECTIONS)
    )


# ---------------------------------------------------------------- the teacher: transformers' ViTModel


def hf_teacher(arch: Arch, seed: int):
    config = transformers.ViTConfig(
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        num_channels=arch.channels,
        hidden_size=arch.width,
        num_hidden_layers=arch.depth,
        num_attention_heads=arch.heads,
        intermediate_size=4 * arch.width,
        hidden_act="gelu",
        layer_norm_eps=layers.LAYER_NORM_EPS,
        qkv_bias=True,
        attn_implementation="eager",
    )
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "layernorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                tensor.copy_(base + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("bias"):
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
            elif "token" in name or "position" in name:
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / np.sqrt(np.prod(tensor.shape[1:])))
    return model


def timm_layout(state_dict, prefix: str = "") -> dict[str, np.ndarray]:
    """transformers' ``ViTModel`` names -> timm's (the official releases'), each key after ``prefix``."""
    sd = {k: v.detach().numpy().copy() for k, v in state_dict.items()}
    out = {
        "cls_token": sd.pop("embeddings.cls_token"),
        "pos_embed": sd.pop("embeddings.position_embeddings"),
        "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": sd.pop("layernorm.weight"),
        "norm.bias": sd.pop("layernorm.bias"),
    }
    for i in sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")}):
        src, dst = f"layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = np.concatenate([sd.pop(f"{src}attention.{p}_proj.{kind}") for p in "qkv"])
            for hf_name, name in (
                ("attention.o_proj", "attn.proj"),
                ("layernorm_before", "norm1"),
                ("layernorm_after", "norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[f"{dst}{name}.{kind}"] = sd.pop(f"{src}{hf_name}.{kind}")
    assert not sd, sorted(sd)
    return {prefix + k: v for k, v in out.items()}


def reference_targets(teacher, images: np.ndarray):
    """``(features [B, N, D], log-attention [B, 1 + K, H, N], query_ids [B, K], output [B, 1 + N, D])``."""
    with torch.no_grad():
        out = teacher(pixel_values=torch.from_numpy(images), output_hidden_states=True, output_attentions=True)
    blocks = out.hidden_states  # [embeddings, block 1, ..., block L]
    features = ((blocks[-2] + blocks[-1]) / 2)[:, 1:].numpy()
    log_probs = torch.log(out.attentions[-1])[..., 1:]  # [B, H, 1 + N, N]: the logits up to a constant per row
    query_ids = torch.topk(log_probs[:, :, 0].mean(dim=1), TOP_K, dim=1).indices
    picked = torch.stack([log_probs[b][:, 1 + query_ids[b]] for b in range(len(images))])  # [B, H, K, N]
    rows = torch.cat([log_probs[:, :, :1], picked], dim=2).transpose(1, 2)
    return features, rows.numpy(), query_ids.numpy(), out.last_hidden_state.numpy()


def log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x - x.max(axis, keepdims=True)).sum(axis, keepdims=True)) - x.max(axis, keepdims=True)


def teacher_params_through_a_file(reference, method, path):
    """The reference's weights as a DINO training checkpoint would hold them, read by our importer."""
    weights = timm_layout(reference.state_dict(), prefix="backbone.")
    weights["head.mlp.0.weight"] = np.zeros((8, ARCH.width), np.float32)  # DINO's projection head: dropped
    torch.save({"teacher": {k: torch.from_numpy(v) for k, v in weights.items()}, "epoch": 100}, path)
    return vit_checkpoint.load(path, method.teacher, ARCH.channels)


def test_teacher_targets_match_transformers_vit(tmp_path):
    reference = hf_teacher(ARCH, seed=0)
    method = tec_method()
    params = teacher_params_through_a_file(reference, method, tmp_path / "checkpoint.pth")
    images = np.random.default_rng(1).normal(size=(2, 1, 28, 28)).astype(np.float32)
    features, log_attention, query_ids, output = reference_targets(reference, images)

    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    targets = jax.jit(method.targets)({"teacher": params}, nhwc)
    ours_output, _ = method.teacher.apply({"params": params}, nhwc)
    np.testing.assert_allclose(ours_output, output, atol=ATOL)  # the imported encoder is the reference's
    np.testing.assert_allclose(targets.features, features, atol=ATOL)
    np.testing.assert_array_equal(targets.query_ids, query_ids)
    np.testing.assert_allclose(log_softmax(targets.attention), log_softmax(log_attention), atol=1e-4)


# ---------------------------------------------------------------- the student: written out in PyTorch


def rand(rng, *shape, scale=None):
    scale = 1 / np.sqrt(shape[0]) if scale is None else scale
    return (scale * rng.normal(size=shape)).astype(np.float32)


def linear(rng, fan_in, fan_out):
    return {"kernel": rand(rng, fan_in, fan_out), "bias": rand(rng, fan_out, scale=0.05)}


def norm(rng, width):
    return {"scale": 1 + rand(rng, width, scale=0.2), "bias": rand(rng, width, scale=0.1)}


def mlp(rng, width, hidden):
    return {"fc1": linear(rng, width, hidden), "fc2": linear(rng, hidden, width)}


def student_params(hf_student, rng) -> dict:
    """Our student's parameters: the transformers MAE's encoder and decoder blocks, random adaptors and heads."""
    official = hf_to_official(hf_student.state_dict())  # views of the live tensors, which the reference changes
    official = {k: np.array(v) for k, v in official.items()}
    plain = mae_checkpoint.from_state_dict(official, mae.from_sections(model_section(), mae.default_config()).model)
    width, decoder, groups = ARCH.width, ARCH.decoder_width, 2
    chunk = ARCH.depth * width // groups
    return {
        "encoder": plain["encoder"] | {"cls_token_mlp": mlp(rng, width, 4 * width)},
        "adaptor": {"norm_before": norm(rng, ARCH.depth * width), "norm_after": norm(rng, width)}
        | {f"fuse_{g}": linear(rng, chunk, width) for g in range(groups)}
        | {f"mlp_{g}": mlp(rng, width, 4 * decoder) for g in range(groups)},
        "feature_input": {"embed": plain["decoder"]["embed"], "mask_token": plain["decoder"]["mask_token"]},
        "decoder_blocks": plain["decoder"]["transformer"],
        "feature_norm": plain["decoder_norm"],
        "feature_head": linear(rng, decoder, width),
        "attention_input": {"embed": linear(rng, width, decoder), "mask_token": rand(rng, 1, 1, decoder, scale=0.5)},
        "attention_norm": norm(rng, decoder),
        "attention_head": linear(rng, decoder, 2 * width),
    }


def t(x):
    return torch.from_numpy(np.asarray(x))


def t_linear(x, p):
    return x @ t(p["kernel"]) + t(p["bias"])


def t_norm(x, p):
    return F.layer_norm(x, (x.shape[-1],), t(p["scale"]), t(p["bias"]), eps=layers.LAYER_NORM_EPS)


def t_mlp(x, p):
    return t_linear(F.gelu(t_linear(x, p["fc1"])), p["fc2"])


def reference_student_loss(hf_student, params, images, noise, targets, query_ids):
    """TEC's ``(feature loss, attention loss)`` on transformers' MAE pieces, the rest written out."""
    with torch.no_grad():
        encoder = params["encoder"]
        hf_student.vit.embeddings.cls_token.copy_(t_mlp(t(encoder["cls_token"]), encoder["cls_token_mlp"]))
        out = hf_student.vit(pixel_values=t(images), noise=t(noise), output_hidden_states=True)
        # Feature adaptor: every block's output, the last one normalised, as one vector per token.
        blocks = [*out.hidden_states[1:-1], out.last_hidden_state]
        x = t_norm(torch.cat(blocks, dim=-1), params["adaptor"]["norm_before"])
        fused = 0
        for g, chunk in enumerate(x.chunk(2, dim=-1)):
            y = t_linear(chunk, params["adaptor"][f"fuse_{g}"])
            fused = fused + y + t_mlp(y, params["adaptor"][f"mlp_{g}"])
        latent = t_norm(fused, params["adaptor"]["norm_after"])

        def decode(inputs):  # embed, mask tokens, unshuffle to grid order, positions, the shared blocks
            x = t_linear(latent, inputs["embed"])
            batch, kept, width = x.shape
            masks = t(inputs["mask_token"]).expand(batch, noise.shape[1] + 1 - kept, width)
            patches = torch.cat([x[:, 1:], masks], dim=1)
            patches = torch.gather(patches, 1, out.ids_restore[..., None].expand(-1, -1, width))
            x = torch.cat([x[:, :1], patches], dim=1) + hf_student.decoder.decoder_pos_embed
            for layer in hf_student.decoder.decoder_layers:
                x = layer(x)
            return x

        pred = t_linear(t_norm(decode(params["feature_input"]), params["feature_norm"]), params["feature_head"])[:, 1:]
        features = t(targets)
        features = (features - features.mean(dim=1, keepdim=True)) / (features.var(dim=1, keepdim=True) + 1e-6) ** 0.5
        per_token = ((pred - features) ** 2).mean(dim=-1)
        feature_loss = (per_token * out.mask).sum() / out.mask.sum()

        query_key = t_linear(
            t_norm(decode(params["attention_input"]), params["attention_norm"]), params["attention_head"]
        )
        batch, length, _ = query_key.shape
        query, key = query_key.reshape(batch, length, 2, ARCH.heads, -1).unbind(dim=2)  # [B, 1 + N, H, c]
        rows = torch.cat([torch.zeros_like(t(query_ids[:, :1])), 1 + t(query_ids)], dim=1)  # cls, then patches
        queries = torch.stack([query[b, rows[b]] for b in range(batch)])  # [B, 1 + K, H, c]
        logits = torch.einsum("bqhc,bnhc->bqhn", queries, key[:, 1:]) / ARCH.width**0.5
        return feature_loss.item(), logits.numpy()


def test_tec_loss_matches_an_independent_pytorch_reference(tmp_path):
    teacher = hf_teacher(ARCH, seed=2)
    hf_student = hf_model(ARCH, seed=3)
    rng = np.random.default_rng(4)
    method = tec_method()
    params = student_params(hf_student, rng)
    frozen = {"teacher": vit_checkpoint.from_state_dict(timm_layout(teacher.state_dict()), method.teacher, 1)}
    shapes = nn.unbox(jax.eval_shape(method.init, jax.random.key(0), method.example_batch(2)).params)
    assert jax.tree.structure(shapes) == jax.tree.structure(params)

    images = rng.normal(size=(2, 1, 28, 28)).astype(np.float32)
    noise = rng.uniform(size=(2, 196)).astype(np.float32)
    features, log_attention, query_ids, _ = reference_targets(teacher, images)
    expected_feature_loss, predicted = reference_student_loss(hf_student, params, images, noise, features, query_ids)
    target = torch.softmax(t(log_attention) / TEMPERATURE, dim=-1)
    expected_attention_loss = (-target * torch.log_softmax(t(predicted), dim=-1)).sum(dim=-1).mean().item()

    ids = masking.random_masking(noise, method.layout)
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    loss, metrics = jax.jit(method.objective)(params, frozen, nhwc, ids)
    errors = (
        abs(float(metrics["feature_loss"]) - expected_feature_loss),
        abs(float(metrics["attention_loss"]) - expected_attention_loss),
    )
    print(f"TEC: |feature loss| {errors[0]:.2e}, |attention loss| {errors[1]:.2e}")
    assert errors[0] <= 1e-5 and errors[1] <= 1e-5
    assert abs(float(loss) - expected_feature_loss - expected_attention_loss) <= 2e-5


def test_encoder_keeps_the_input_adaptor_and_folds_it_for_an_encoder_without_one():
    """TEC's fine-tuning keeps ``cls_token_mlp`` (``--mlp_token``); a plain ViT (an export, a fine-tuning with
    ``cls_token_mlp=False``, TEC's released weights) takes the adaptor's output as its cls token: the same features."""
    method = tec_method()
    rng = np.random.default_rng(5)
    params = student_params(hf_model(ARCH, seed=6), rng)
    images = jnp.asarray(rng.normal(size=(2, 28, 28, 1)).astype(np.float32))
    module, encoder = method.encoder(params)
    assert "cls_token_mlp" in encoder and module.cls_token_mlp and module.taps is None
    plain = module.clone(cls_token_mlp=False)
    folded = plain.adapt_pretrained(encoder, module)
    assert "cls_token_mlp" not in folded
    np.testing.assert_allclose(
        plain.apply({"params": folded}, images), module.apply({"params": encoder}, images), atol=ATOL
    )


# ---------------------------------------------------------------- partial and progressive reconstruction


def test_partial_attention_loss_leaves_out_thrown_keys_and_queries():
    rng = np.random.default_rng(7)
    batch, queries, heads, num_tokens = 2, 4, 3, 10
    predicted, target = (rng.normal(size=(batch, queries, heads, num_tokens)).astype(np.float32) for _ in range(2))
    key_valid = rng.uniform(size=(batch, num_tokens)) < 0.6
    query_valid = np.array([[True, True, False, True], [True, False, False, True]])

    expected, count = 0.0, 0
    for b, q, h in np.ndindex(batch, queries, heads):
        if query_valid[b, q]:
            keys = key_valid[b]
            p = np.exp(log_softmax(target[b, q, h, keys] / TEMPERATURE))
            expected -= np.sum(p * log_softmax(predicted[b, q, h, keys]))
            count += 1
    loss = tec_lib.attention_loss(predicted, target, TEMPERATURE, jnp.asarray(query_valid), jnp.asarray(key_valid))
    assert abs(float(loss) - expected / count) < 1e-5

    # Whatever stands at a thrown key or query changes nothing, and gets no (and no NaN) gradient.
    thrown = ~key_valid[:, None, None, :] | ~query_valid[:, :, None, None]
    noise = np.where(thrown, 100 * rng.normal(size=predicted.shape), 0).astype(np.float32)
    perturbed = tec_lib.attention_loss(predicted + noise, target - noise, TEMPERATURE, query_valid, key_valid)
    assert abs(float(perturbed) - float(loss)) < 1e-6
    gradient = jax.grad(tec_lib.attention_loss)(jnp.asarray(predicted), target, TEMPERATURE, query_valid, key_valid)
    assert np.all(np.isfinite(gradient)) and np.all(np.asarray(gradient)[np.broadcast_to(thrown, gradient.shape)] == 0)


def random_values(shapes, seed: int):
    """Random values in ``shapes`` (LayerNorm scales near 1), without compiling an initialiser."""
    rng = np.random.default_rng(seed)

    def value(path, shape):
        noise = 0.2 * rng.normal(size=shape.shape).astype(np.float32)
        return 1.0 + noise if layers.path_names(path)[-1] == "scale" else noise

    return jax.tree_util.tree_map_with_path(value, nn.unbox(shapes))


def test_pr_mim_is_one_key_and_changes_only_the_thrown_tokens():
    small = model_section(dataclasses.replace(ARCH, width=16, depth=2), adaptor_groups=1)
    partial, progressive = (tec_method(name, small) for name in ("partial", "progressive"))
    layout = progressive.layout
    assert tec_method("full", small).layout.num_thrown == 0
    assert partial.layout.num_thrown == layout.num_thrown == round(layout.num_tokens * 0.5)
    assert progressive.config.method.sampler == "furthest"

    rng = np.random.default_rng(8)
    ids = progressive.sample(np.stack([masking.draw_noise(rng, layout) for _ in range(2)]))
    batch = dict(images=jnp.asarray(rng.normal(size=(2, 28, 28, 1)), jnp.float32), ids_visible=ids.visible)
    batch |= dict(ids_decoded=ids.decoded, ids_thrown=ids.thrown)
    variables = jax.eval_shape(progressive.init, jax.random.key(0), batch)
    params = random_values(variables.params, seed=9)
    shared = {k: v for k, v in params.items() if not k.endswith("aggregation")}
    query_ids = jnp.asarray(rng.permutation(layout.num_tokens)[:TOP_K][None].repeat(2, 0), jnp.int32)

    def predict(method, p):
        return jax.jit(method.model.apply)({"params": p}, batch["images"], *ids, query_ids=query_ids)

    full_grid, holes = predict(progressive, params), predict(partial, shared)
    np.testing.assert_allclose(full_grid.pred_decoded, holes.pred_decoded, atol=1e-6)
    # Progressive reconstruction adds the thrown tokens' feature loss and nothing else.
    targets = tec_lib.normalize_over_tokens(rng.normal(size=(2, layout.num_tokens, 16)).astype(np.float32))
    unweighted = tec_lib.feature_loss(targets, full_grid, ids.decoded, ids.thrown, thrown_weight=0.0)
    assert abs(float(unweighted) - float(tec_lib.feature_loss(targets, holes, ids.decoded, ids.thrown))) < 1e-6
    # The attention decoder's keys and queries change at the thrown tokens only (aggregated, not empty).
    present = np.asarray(tec.present_tokens(ids, layout.num_tokens))
    queries_present = np.concatenate([np.ones((2, 1), bool), np.take_along_axis(present, query_ids, 1)], 1)
    same = queries_present[:, :, None, None] & present[:, None, None, :]
    difference = np.abs(np.asarray(full_grid.attention) - np.asarray(holes.attention))
    assert difference[np.broadcast_to(same, difference.shape)].max() < 1e-5
    assert difference[np.broadcast_to(~same, difference.shape)].min() > 0
    assert np.asarray(present).sum(1).tolist() == [layout.num_visible + layout.num_decoded] * 2


# ---------------------------------------------------------------- the teacher's source and the trainer


def test_a_run_without_a_teacher_says_what_to_set_and_what_to_pretrain_first(tmp_path):
    sections = dict(model=model_section()) | DEFAULT_SECTIONS
    for teacher, problem in (({}, "neither is set"), (dict(checkpoint="a.pth", workdir="run"), "both are set")):
        config = ml_collections.ConfigDict(sections | dict(method=tec.default_config(teacher=teacher)))
        with pytest.raises(
            ValueError, match=f"{problem}.*teacher.checkpoint=PATH.*teacher.workdir=DIR.*pretrain_fmnist"
        ):
            methods.build(config)
    empty = tec_method(teacher=dict(checkpoint=None, workdir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"config\.json is missing.*pretrain one first"):
        empty.teacher_weights(runs.load)
    deit = {"cls_token": np.zeros((1, 1, 32), np.float32), "dist_token": np.zeros((1, 1, 32), np.float32)}
    weight_files.write(deit, tmp_path / "deit.safetensors")
    with pytest.raises(mae_checkpoint.CheckpointMismatchError, match="distilled DeiT"):
        vit_checkpoint.load(tmp_path / "deit.safetensors", tec_method().teacher, 1)
