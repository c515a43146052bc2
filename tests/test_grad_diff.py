"""The gradient-difference analysis of the paper's Fig. 4."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_model_config

from prmim_jax import masking, methods
from prmim_jax.methods import mae as mae_family
from prmim_jax.tools import grad_diff


def setup():
    model_config = tiny_model_config()
    method = mae_family.from_sections(model_config, methods.method_config("prmim"))
    model = method.model
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 28, 28, 1)).astype(np.float32))
    noise = np.stack([masking.draw_noise(rng, method.layout) for _ in range(4)])
    params = nn.unbox(model.init(jax.random.key(0), images, *method.sample(noise)))["params"]
    return model_config, params, images, noise


def test_nothing_thrown_means_no_gradient_difference():
    rows = grad_diff.gradient_differences(*setup(), throw_ratios=(0.0,), samplers=("random_throw",))
    assert {(r["method"], r["rho_d"]) for r in rows} == {("partial", 0.0), ("prmim", 0.0)}
    # Zero up to float32 summation order: the samplers list the same decoded tokens in another order.
    assert all(r["relative_l2"] < 1e-6 for r in rows), rows


def test_throwing_tokens_moves_the_gradient_and_more_so_the_more_is_thrown():
    rows = grad_diff.gradient_differences(*setup(), throw_ratios=(0.25, 0.65), samplers=("random_throw", "furthest"))
    assert len(rows) == 8
    partial = {(r["sampler"], r["rho_d"]): r["relative_l2"] for r in rows if r["method"] == "partial"}
    for sampler in ("random_throw", "furthest"):
        assert 0 < partial[(sampler, 0.25)] < partial[(sampler, 0.65)]
    assert all(np.isfinite(r["relative_l2"]) and r["relative_l2"] > 0 for r in rows)
