"""Methods are chosen in config, combine with every sampler, and bad choices fail before compiling."""

import jax
import numpy as np
import pytest
from conftest import tiny_model_config

from prmim_jax import masking, methods, optim


@pytest.mark.parametrize("name", methods.METHODS)
@pytest.mark.parametrize("sampler", masking.SAMPLERS)
def test_every_method_combines_with_every_sampler_that_can_serve_it(name, sampler):
    throw_ratio = 0.0 if name == "mae" or sampler == "random" else 0.5
    model, method = methods.build(
        tiny_model_config(), methods.method_config(name, sampler=sampler, throw_ratio=throw_ratio)
    )
    assert model.aggregation_kernel == (7 if name == "prmim" else 0)
    noise = np.stack([masking.draw_noise(np.random.default_rng(i), method.layout) for i in range(2)])
    masking.check_token_ids(method.sample(noise), method.layout)


def test_defaults_are_the_papers():
    config = methods.method_config()
    assert (config.name, config.sampler, config.mask_ratio, config.throw_ratio, config.kernel_size) == (
        "prmim",
        "furthest",
        0.75,
        0.5,
        7,
    )
    assert methods.method_config("mae").throw_ratio == 0.0 and methods.method_config("mae").sampler == "random"


@pytest.mark.parametrize(
    "name, overrides, model_overrides, message",
    [
        ("mae", dict(throw_ratio=0.5), {}, "method 'mae' reconstructs every masked token"),
        ("simmim", {}, {}, "unknown method 'simmim'"),
        ("prmim", dict(throw_ratio=0.8), {}, "only masked tokens can be thrown"),
        ("prmim", dict(sampler="random"), {}, "sampler 'random' .* throws nothing"),
        ("prmim", dict(sampler="grid"), {}, "unknown token sampler 'grid'"),
        ("prmim", dict(kernel_size=9), dict(image_size=16), "must be odd and fit the 8x8 token grid"),
        ("prmim", dict(kernel_size=4), {}, "must be odd"),
        ("prmim", dict(thrown_loss_weight=-1.0), {}, "thrown_loss_weight"),
    ],
)
def test_impossible_methods_fail_before_compiling_with_the_fix(name, overrides, model_overrides, message):
    with pytest.raises(ValueError, match=message):
        methods.build(tiny_model_config(**model_overrides), methods.method_config(name, **overrides))


def test_partial_with_a_kernel_setting_builds_no_aggregation():
    model, _ = methods.build(tiny_model_config(), methods.method_config("partial", kernel_size=3))
    assert model.aggregation_kernel == 0


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
