"""The layers every model here is built from: initialisers, the linear layer, LayerNorm, the MLP.

Every parameter and activation names logical axes only; the mapping to mesh
axes lives in config (``prmim_jax.sharding``). Logical names used here and in
the models:

- ``batch``, ``tokens``: activation leading axes.
- ``embed``: model width; ``decoder_embed`` is the decoder width where one
  kernel holds both widths (the encoder -> decoder projection).
- ``mlp``: hidden width of the feed-forward block.
- ``heads``, ``kv``: attention heads and per-head width.
- ``patch``: flattened pixels of one patch, ``p * p * C``.

Initialisation follows the official MAE (facebookresearch/mae) so that
training from scratch behaves like the reference: xavier-uniform linears with
the fans of the PyTorch weight matrix (the fused ``qkv`` is one ``[3D, D]``
matrix there, so q, k and v use those fans), zero biases, LayerNorm 1 / 0.

Precision policy (``dtype``, the compute dtype; ``float32`` or ``bfloat16``).
In float32 everything is float32 and the model computes what the official MAE
computes. With ``dtype=bfloat16``:

- Parameters, and so the optimizer state, stay float32 (every ``param`` is
  created float32 and cast to bfloat16 where a matmul reads it).
- Matmuls (q/k/v/out projections, MLP, embeddings) take bfloat16 operands and
  return bfloat16; the MLP's GELU runs in bfloat16.
- Attention keeps its logits and softmax in float32 (``prmim_jax.models.attention``).
- LayerNorm computes its statistics, the normalisation and the affine map in
  float32 (flax promotes to float32) and emits bfloat16: every consumer is a
  bfloat16 matmul that would round its input to bfloat16 anyway, so the values
  are identical either way, its consumers read half the bytes, and XLA fuses
  the cast into the norm (XLA CPU's counts of both choices:
  ``benchmarks/results/design_choices_cpu.md``, "precision").
- The residual stream is float32 (``residual_dtype``): each block adds its
  bfloat16 branch outputs to a float32 sum, so 24 (ViT-B) to 64 (ViT-H)
  additions do not round at bfloat16's 8 bits. Its cost is the residual
  copies kept for the backward pass; see ``residual_dtype``.
- Heads and losses are float32: MAE's decoder norm and pixel head, the
  classifier's ``fc_norm`` and head, and the losses (``prmim_jax.models.mae``,
  ``prmim_jax.models.classifier``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYER_NORM_EPS = 1e-6


def path_names(path) -> list[str]:
    """A parameter's tree path as names, without the ``value`` of logically partitioned (boxed) leaves."""
    names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
    return names[:-1] if names[-1] == "value" else names


def uniform_init(bound: float) -> nn.initializers.Initializer:
    """U(-bound, bound), the form of PyTorch's xavier-uniform and default bias inits."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def xavier_uniform(fan_in: int, fan_out: int) -> nn.initializers.Initializer:
    """xavier-uniform with explicit fans, so reshaped kernels keep PyTorch's fans."""
    return uniform_init(math.sqrt(6.0 / (fan_in + fan_out)))


def logical(init, *names):
    return nn.with_logical_partitioning(init, names)


def mean_pool(grid: jax.Array, factor: int) -> jax.Array:
    """``[B, H, W, ...]`` -> ``[B, H / factor, W / factor, ...]``: means over ``factor x factor`` blocks."""
    if factor == 1:
        return grid
    batch, height, width = grid.shape[:3]
    blocks = grid.reshape(batch, height // factor, factor, width // factor, factor, *grid.shape[3:])
    return blocks.mean(axis=(2, 4))


def layer_norm(dtype, name: str | None = None, epsilon: float = LAYER_NORM_EPS) -> nn.LayerNorm:
    """LayerNorm over the last axis (logical ``embed``), eps ``epsilon`` (MAE's 1e-6; PyTorch's default 1e-5)."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        use_fast_variance=False,
        scale_init=logical(nn.initializers.ones, "embed"),
        bias_init=logical(nn.initializers.zeros, "embed"),
        name=name,
    )


def residual_dtype(dtype) -> jnp.dtype:
    """The residual stream's dtype for compute dtype ``dtype``: float32 under bfloat16 (the policy above).

    Its cost on XLA CPU's compiled ViT-B/16 MAE train step: the same
    temporary memory as a bfloat16 stream and a few percent more bytes
    accessed (``benchmarks/results/design_choices_cpu.md``, "precision"). XLA
    CPU computes bfloat16 arithmetic in float32, so the GPU check is the one
    that sizes this choice on an accelerator.
    """
    return jnp.promote_types(dtype, jnp.float32)


def flattens_tokens() -> bool:
    """Whether linear layers multiply ``[..., D]`` activations as one ``[M, D]`` matrix (the CPU backend).

    Why: XLA CPU lowers a weight gradient that contracts two or more axes
    (``[B, T, D]`` activations against ``[B, T, F]`` output gradients) as a
    transposed copy of an operand and a slower general contraction; a single
    contracted axis reaches its fast matrix-product path, which brings the
    whole ViT-B MAE step markedly closer to PyTorch's time on the same core
    (``benchmarks/results/cpu_components.md`` times each part both ways,
    ``cpu_side_by_side.md`` the step). The reshapes are free, and the
    parameters, their shapes and the values are the same either way. Off the
    CPU the layers are left as they are (GPU and TPU compilers batch such
    products natively, and sharded batch axes stay separate axes).
    """
    return jax.default_backend() == "cpu"


class FlatDense(nn.Dense):
    """``nn.Dense`` (the same parameters) that multiplies ``[..., D]`` inputs as ``[M, D]`` on the CPU backend
    (``flattens_tokens``); ``[..., D] -> [..., features]``."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if inputs.ndim <= 2 or not flattens_tokens():
            return super().__call__(inputs)
        flat = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return flat.reshape(*inputs.shape[:-1], flat.shape[-1])


def dense(
    features: int,
    fan_in: int,
    axes: tuple[str, str],
    dtype,
    name: str,
    fan_out: int | None = None,
    kernel_init: nn.initializers.Initializer | None = None,
) -> FlatDense:
    """A linear layer initialised as the official MAE's ``nn.Linear`` (xavier-uniform weight, zero bias);
    ``kernel_init`` replaces the xavier-uniform weight init (Swin's normal(0.02))."""
    return FlatDense(
        features,
        dtype=dtype,
        kernel_init=logical(kernel_init or xavier_uniform(fan_in, fan_out or features), *axes),
        bias_init=logical(nn.initializers.zeros, axes[1]),
        name=name,
    )


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, ``x * (1 + erf(x / sqrt(2))) / 2``, written as PyTorch's ``nn.GELU()`` computes it.

    ``jax.nn.gelu(approximate=False)`` computes the same function as
    ``x * erfc(-x / sqrt(2)) / 2``; XLA CPU's ``erfc`` costs more than its
    ``erf``, and its gradient divides by ``sqrt(2)``, which XLA CPU keeps as a
    division it will not fuse twice, so this form makes the forward +
    backward pass of MAE's decoder MLP faster on the CPU
    (``benchmarks/results/design_choices_cpu.md``, "gelu"). The two agree to
    float32 rounding; ``erf`` loses relative accuracy only where GELU's output is
    below ``1e-7 |x|``.
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class MlpBlock(nn.Module):
    """``[B, T, D] -> [B, T, D]``: linear to ``mlp_dim``, exact (erf) GELU, linear back.

    ``kernel_init``: None for MAE's xavier-uniform, else both kernels' init."""

    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer | None = None

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = dense(self.mlp_dim, width, ("embed", "mlp"), self.dtype, "fc1", kernel_init=self.kernel_init)(x)
        h = nn.with_logical_constraint(gelu(h), ("batch", "tokens", "mlp"))
        out = dense(width, self.mlp_dim, ("mlp", "embed"), self.dtype, "fc2", kernel_init=self.kernel_init)(h)
        return nn.with_logical_constraint(out, ("batch", "tokens", "embed"))
