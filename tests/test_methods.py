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
