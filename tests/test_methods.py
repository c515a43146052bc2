"""Methods are plug-ins looked up by name, combine with every sampler, and bad choices fail before compiling."""

import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from conftest import mae_experiment, tiny_model_config

from prmim_jax import masking, methods, optim
from prmim_jax.data import schema
from prmim_jax.methods import mae as mae_family
from prmim_jax.models import mae as mae_lib

PACKAGE = pathlib.Path(methods.__file__).parent.parent


def tiny_method(name="prmim", model_overrides=None, **overrides):
    return mae_family.from_sections(
        tiny_model_config(**(model_overrides or {})), methods.method_config(name, **overrides)
    )


def test_a_method_is_the_module_its_name_names():
    assert {"mae", "simmim", "classify", "partial", "prmim"} <= set(methods.available())
    config = ml_collections.ConfigDict(dict(method=methods.method_config("mae")))
    assert methods.registration(config.method.name).method.__module__ == "prmim_jax.methods.mae"
    with pytest.raises(ValueError, match="unknown method 'beit'; choose one of"):
        methods.method_config("beit")


def test_earlier_method_names_are_the_mae_family_with_one_key_set():
    assert methods.canonical_section(methods.method_config("prmim")).reconstruction == "progressive"
    assert methods.method_config("prmim").name == "mae"
    assert methods.method_config("partial").reconstruction == "partial"
    assert methods.method_config("mae").reconstruction == "full"


@pytest.mark.parametrize("name", ["mae", "partial", "prmim"])
@pytest.mark.parametrize("sampler", masking.SAMPLERS)
def test_every_method_combines_with_every_sampler_that_can_serve_it(name, sampler):
    throw_ratio = 0.0 if name == "mae" or sampler == "random" else 0.5
    method = tiny_method(name, sampler=sampler, throw_ratio=throw_ratio)
    assert method.model.aggregation_kernel == (7 if name == "prmim" else 0)
    noise = np.stack([masking.draw_noise(np.random.default_rng(i), method.layout) for i in range(2)])
    masking.check_token_ids(method.sample(noise), method.layout)


def test_defaults_are_the_papers():
    config = methods.method_config("prmim")
    assert (config.reconstruction, config.sampler, config.mask_ratio, config.throw_ratio, config.kernel_size) == (
        "progressive",
        "furthest",
        0.75,
        0.5,
        7,
    )
    assert config.aggregator == "dwconv"
    assert methods.method_config("mae").throw_ratio == 0.0 and methods.method_config("mae").sampler == "random"


@pytest.mark.parametrize(
    "name, overrides, model_overrides, message",
    [
        ("mae", dict(throw_ratio=0.5), {}, "reconstruction 'full' reconstructs every masked token"),
        ("prmim", dict(throw_ratio=0.8), {}, "only masked tokens can be thrown"),
        ("prmim", dict(sampler="random"), {}, "sampler 'random' .* throws nothing"),
        ("prmim", dict(sampler="grid"), {}, "unknown token sampler 'grid'"),
        ("prmim", dict(kernel_size=9), dict(image_size=16), "kernel_size=9 does not fit the 8x8 token grid"),
        ("prmim", dict(kernel_size=4), {}, "must be an odd integer >= 3"),
        ("prmim", dict(thrown_loss_weight=-1.0), {}, "thrown_loss_weight"),
        ("prmim", dict(reconstruction="half"), {}, "method.reconstruction='half'; choose one of"),
        ("prmim", dict(aggregator="mlp"), {}, "method.aggregator='mlp'; choose one of"),
        ("prmim", dict(kernal_size=3), {}, r"unknown keys \['kernal_size'\]"),
        # VideoMAE V2's running-cell decoder: partial reconstruction with the running cell, on even grids.
        *(
            (name, dict(sampler="running_cell", running_cell_decoder="videomae") | more, model, message)
            for name, more, model, message in [
                ("partial", dict(throw_ratio=0.5), dict(image_size=14), r"even sides, not 7x7: choose an image size"),
                ("prmim", {}, {}, r"cannot be reconstruction 'progressive'; set method.reconstruction='partial'"),
                ("mae", {}, {}, r"cannot be reconstruction 'full'; set method.reconstruction='partial'"),
                ("partial", dict(sampler="furthest"), {}, r"set method.sampler='running_cell', or method.running"),
                ("partial", dict(throw_ratio=0.3), {}, r"throw_ratio must be one of \(0.25, 0.5, 0.75\)"),
                ("partial", dict(throw_ratio=0.0), {}, r"needs a cell that skips tokens.*set method.throw_ratio"),
                ("partial", dict(running_cell_decoder="official"), {}, r"choose one of \('masked', 'videomae'\)"),
            ]
        ),
    ],
)
def test_impossible_methods_fail_before_compiling_with_the_fix(name, overrides, model_overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_method(name, model_overrides, **overrides)


def test_partial_with_a_kernel_setting_builds_no_aggregation():
    assert tiny_method("partial", kernel_size=3).model.aggregation_kernel == 0


def test_weight_decay_skips_biases_norms_and_tokens(tiny_params):
    mask = optim.weight_decay_mask(tiny_params)
    flat = {jax.tree_util.keystr(path): decays for path, decays in jax.tree_util.tree_leaves_with_path(mask)}
    assert not flat["['encoder']['cls_token']"] and not flat["['decoder']['mask_token']"]
    assert not any(decays for key, decays in flat.items() if key.endswith(("['bias']", "['scale']")))
    assert flat["['encoder']['transformer']['block_0']['attn']['query']['kernel']"]
    assert flat["['pred']['kernel']"]


def test_learning_rate_follows_the_linear_scaling_rule_with_warmup_and_cosine():
    config = optim.optimizer_config(base_lr=1.5e-4, warmup_steps=10)
    schedule = optim.learning_rate_schedule(config, global_batch=4096, total_steps=100)
    assert optim.peak_learning_rate(config, 4096) == pytest.approx(2.4e-3)  # the paper's Table 13
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(2.4e-3)
    assert float(schedule(55)) == pytest.approx(2.4e-3 / 2, rel=1e-3)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def tiny_experiment(framework, **method_overrides):
    """A 28x28 one-channel experiment of ``framework`` with a 14x14 grid (patch 2), tiny widths."""
    from prmim_jax.models import simmim as simmim_model

    config = mae_experiment()
    config.data = schema.data_config(source="fashion_mnist")
    if framework == "simmim":
        config.model = simmim_model.model_config("Ti/2", width=32, depth=1, num_heads=4, image_size=28, channels=1)
        method_overrides.setdefault("mask_patch_size", 4)
    else:
        config.model = tiny_model_config()
    config.method = methods.method_config(framework, **method_overrides)
    return config


@pytest.mark.parametrize(
    "framework, aggregator",
    [("mae", "dwconv"), ("mae", "transformer"), ("simmim", "convnext"), ("simmim", "avgpool")],
)
def test_every_aggregation_design_reconstructs_the_thrown_tokens_of_every_framework(framework, aggregator):
    config = tiny_experiment(framework, reconstruction="progressive", aggregator=aggregator, kernel_size=3)
    method = methods.build(config)
    batch = method.example_batch(2)
    rng = np.random.default_rng(0)
    noise = np.stack([masking.draw_noise(rng, method.layout) for _ in range(2)])
    ids = method.sample(noise)
    batch.update(images=rng.normal(size=batch["images"].shape).astype(np.float32))
    batch.update(ids_visible=ids.visible, ids_decoded=ids.decoded, ids_thrown=ids.thrown)
    params = nn_unbox(method.init(jax.random.key(0), batch).params)
    loss, grads = jax.value_and_grad(lambda p: method.loss(methods.Variables(p), batch, jax.random.key(1))[0])(params)
    assert np.isfinite(float(loss))
    assert any(np.any(g) for g in jax.tree_util.tree_leaves(grads["encoder"]))
    aggregator_params = {k: v for k, v in grads.items() if k in ("aggregation", "aggregator")}
    assert bool(aggregator_params) == (aggregator != "avgpool")  # the average has nothing to learn
    assert all(np.any(g) for g in jax.tree_util.tree_leaves(aggregator_params) if g.ndim > 1)


def nn_unbox(tree):
    import flax.linen as nn

    return nn.unbox(tree)


# --- VideoMAE V2's running-cell decoder (running_cell_decoder='videomae') ----------------------------------


def videomae_method(**overrides):
    """The tiny MAE (14x14 grid) with partial reconstruction and VideoMAE V2's running-cell decoder at 0.5."""
    return tiny_method("partial", sampler="running_cell", throw_ratio=0.5, running_cell_decoder="videomae", **overrides)


def noise_of(method, batch, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([masking.draw_noise(rng, method.layout) for _ in range(batch)])


def cell_skipped(noise, grid, ratio):
    """``[B, N] bool``: VideoMAE V2's ``decode_masked_pos``, the published cell at each image's pointer."""
    pointers = np.minimum(np.floor(4 * noise[:, 1, 0]).astype(int), 3)
    return masking.running_cell_patterns(grid, ratio)[pointers]


def videomae_v2_loss(images, visible, decode_masked_pos, outputs, patch_size):
    """VideoMAE V2's loss (``engine_for_pretraining.py`` L98-105) in numpy, on boolean grid masks: ``visible`` and
    ``decode_masked_pos`` ``[B, N] bool``, ``outputs [B, N_keep, P]`` in the decoder's order, kept positions
    ascending. Its targets are MAE's norm-pix ones, per patch with ``sqrt(var + 1e-6)``, as the rows use MAE's
    (VideoMAE V2 normalises per patch and channel, by ``std + 1e-6``)."""
    b, h, w, c = images.shape
    p = patch_size
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
    patches = patches.astype(np.float64)
    mean, var = patches.mean(-1, keepdims=True), patches.var(-1, ddof=1, keepdims=True)
    images_patch = (patches - mean) / np.sqrt(var + 1e-6)
    bool_masked_pos = ~visible
    labels = images_patch[~decode_masked_pos].reshape(b, -1, images_patch.shape[-1])
    loss = ((outputs - labels) ** 2).mean(-1)
    cal_loss_mask = bool_masked_pos[~decode_masked_pos].reshape(b, -1)
    return (loss * cal_loss_mask).sum() / cal_loss_mask.sum()


def test_videomae_decoder_loss_is_videomae_v2s_mean_over_the_masked_kept_positions(tiny_params):
    method = videomae_method(mask_ratio=0.5)  # 98 visible tokens: as many as the cell keeps
    noise = noise_of(method, 3)
    ids = method.sample(noise)
    ids = ids._replace(visible=np.concatenate([ids.decoded[:1], ids.visible[1:]]))  # image 0: no masked kept token
    images = np.random.default_rng(1).normal(size=(3, 28, 28, 1)).astype(np.float32)
    loss = float(jax.jit(method.objective)(tiny_params, images, ids))
    pred = np.asarray(jax.jit(method.predict)(tiny_params, images, ids).pred_decoded, np.float64)
    outputs = np.take_along_axis(pred, np.argsort(ids.decoded, axis=1)[..., None], 1)  # kept positions ascending
    visible = np.zeros((3, 196), bool)
    np.put_along_axis(visible, ids.visible, True, 1)
    expected = videomae_v2_loss(images, visible, cell_skipped(noise, (14, 14), 0.5), outputs, patch_size=2)
    assert loss == pytest.approx(expected, rel=1e-5)
    # A batch without any masked kept token: loss 0 and a finite gradient, not 0 / 0.
    nothing_masked_kept = ids._replace(visible=ids.decoded)
    loss, grads = jax.jit(jax.value_and_grad(method.objective))(tiny_params, images, nothing_masked_kept)
    assert float(loss) == 0.0 and all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


def test_the_default_running_cell_decoder_gives_the_loss_from_before_bit_for_bit(tiny_params):
    section = methods.method_config("partial", sampler="running_cell", throw_ratio=0.5)
    assert section.running_cell_decoder == "masked"
    saved_before_the_key = ml_collections.ConfigDict({k: v for k, v in section.items() if k != "running_cell_decoder"})
    default, before = (mae_family.from_sections(tiny_model_config(), s) for s in (section, saved_before_the_key))
    noise = noise_of(default, 4)
    ids = default.sample(noise)
    np.testing.assert_array_equal(np.concatenate(ids, 1), np.concatenate(before.sample(noise), 1))
    images = np.random.default_rng(1).normal(size=(4, 28, 28, 1)).astype(np.float32)

    def objective_before_the_option(params, images, ids):
        output = default.model.apply({"params": params}, images, ids.visible, ids.decoded, ids.thrown)
        return mae_lib.reconstruction_loss(images, output, ids.decoded, ids.thrown, 2, True, 1.0)

    losses = [jax.jit(f)(tiny_params, images, ids) for f in (default.objective, before.objective)]
    reference = jax.jit(objective_before_the_option)(tiny_params, images, ids)
    assert np.asarray(losses[0]).tobytes() == np.asarray(losses[1]).tobytes() == np.asarray(reference).tobytes()


def test_videomae_decoder_picture_shows_visible_tokens_as_given_and_marks_only_masked_ones(tiny_params):
    method = videomae_method()
    images = np.random.default_rng(1).integers(0, 256, size=(2, 28, 28, 1), dtype=np.uint8)
    picture = method.picture(methods.Variables(tiny_params), images, seed=0)
    ids = method.sample(noise_of(method, 2, seed=0))  # the picture's draw
    visible = np.zeros((2, 196), bool)
    np.put_along_axis(visible, ids.visible, True, 1)
    kept = np.zeros((2, 196), bool)
    np.put_along_axis(kept, ids.decoded, True, 1)
    np.testing.assert_array_equal(picture.marks, np.where(visible, 0, np.where(kept, 1, 2)))
    original, _, reconstruction = (r.reshape(2, 14, 2, 14, 2, 3).transpose(0, 1, 3, 2, 4, 5) for r in picture.rows)
    tokens_equal = (original == reconstruction).reshape(2, 196, -1).all(-1)
    assert tokens_equal[visible].all() and visible[~tokens_equal].sum() == 0
    assert (reconstruction.reshape(2, 196, -1)[~visible & ~kept] == 0).all()  # masked, skipped: nothing predicts it
