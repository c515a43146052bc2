"""Multi-head self-attention and the choice of its implementation (cuDNN, XLA, XLA laid out for the CPU).

Attention implementation (``attention_impl``): ``None`` / ``'auto'`` picks
cuDNN's fused kernel on a CUDA GPU when the dtype is bfloat16 or float16 and
the head width is supported (ViT-B's 64 and the MAE decoder's 32 are), and XLA
everywhere else (CPU, TPU, float32); ``'xla'`` and ``'cudnn'`` force one, and
``'cudnn'`` where it cannot run is a ``ValueError`` naming the fix, raised
when the model is built. The rule is ``attention_implementation``. On the
CPU backend the XLA path is ``cpu_attention`` (the same function, laid out
for XLA CPU).

Precision (the policy of ``prmim_jax.models.layers``): the logits are
accumulated in float32, the softmax (and its gradient) is float32, and the
probabilities are cast to the compute dtype for the product with the values.
That is what ``jax.nn.dot_product_attention``'s XLA path does
(``BF16_BF16_F32``), what cuDNN's fused kernel does with its softmax
statistics, and what ``cpu_attention`` does.
"""

from __future__ import annotations

import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from prmim_jax.models import layers
from prmim_jax.models.layers import logical, xavier_uniform

ATTENTION_IMPLS = (None, "auto", "xla", "cudnn")


CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cudnn_attention_problem(
    dtype, head_dim: int, backend: str, compute_capability: tuple[int, int] | None = None, odd_length_bias: bool = False
) -> str | None:
    """Why cuDNN's fused attention cannot run here, as a sentence naming the fix; None when it can.

    ``backend`` is ``jax.default_backend()``; ``compute_capability`` the
    GPU's ``(major, minor)`` (None: unknown, not checked); ``odd_length_bias``
    an additive logit bias on an odd-length sequence (cuDNN's training kernel
    needs even lengths with a bias).
    """
    fix = "use attention_impl='xla' (or 'auto', which picks XLA where cuDNN cannot run)"
    if backend not in ("gpu", "cuda"):
        return f"cuDNN attention needs a CUDA GPU, but the JAX backend is {backend!r}; {fix}."
    if compute_capability is not None and tuple(compute_capability) < (8, 0):
        return f"cuDNN's fused attention needs compute capability 8.0 or newer, not {compute_capability}; {fix}."
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        return f"cuDNN attention computes in bfloat16 or float16, not {jnp.dtype(dtype).name}; set dtype='bfloat16' or {fix}."
    if head_dim % 8 or head_dim > 128:
        return (
            f"cuDNN attention needs a head width (width / num_heads) that is a multiple of 8 and at most 128, "
            f"not {head_dim}; change width or num_heads, or {fix}."
        )
    if odd_length_bias:
        return f"cuDNN attention with an additive bias needs an even sequence length; {fix}."
    return None


def attention_implementation(
    dtype,
    head_dim: int,
    backend: str,
    requested: str | None = "auto",
    compute_capability: tuple[int, int] | None = None,
    odd_length_bias: bool = False,
) -> str:
    """``jax.nn.dot_product_attention``'s implementation for one attention layer: ``'xla'`` or ``'cudnn'``.

    ``requested`` is the config's ``attention_impl``: ``None`` / ``'auto'``
    choose cuDNN where ``cudnn_attention_problem`` finds none, XLA elsewhere
    (and ``fused_attention`` still takes XLA where jax's cuDNN refuses the shapes);
    ``'xla'`` is always XLA; ``'cudnn'`` is cuDNN or a ``ValueError`` saying
    why it cannot run and what to change.
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={requested!r}; choose one of {ATTENTION_IMPLS}.")
    if requested == "xla":
        return "xla"
    problem = cudnn_attention_problem(dtype, head_dim, backend, compute_capability, odd_length_bias)
    if requested == "cudnn" and problem:
        raise ValueError(f"attention_impl='cudnn' cannot run: {problem}")
    return "xla" if problem else "cudnn"


def device_compute_capability() -> tuple[int, int] | None:
    """The first device's CUDA compute capability ``(major, minor)``, or None off CUDA GPUs."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if not capability:
        return None
    major, minor = str(capability).split(".")[:2]
    return int(major), int(minor)


class HeadProjection(nn.Module):
    """``[B, T, D] -> [B, T, heads, kv]`` with kernel ``[D, heads, kv]`` and bias ``[heads, kv]``.

    Written out rather than ``nn.DenseGeneral``, which initialises a flattened
    kernel and so cannot carry the three logical axis names through init.
    """

    num_heads: int
    head_dim: int
    kernel_init: nn.initializers.Initializer
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1], self.num_heads, self.head_dim)
        kernel = self.param("kernel", logical(self.kernel_init, "embed", "heads", "kv"), shape)
        bias = self.param("bias", logical(nn.initializers.zeros, "heads", "kv"), shape[1:])
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if layers.flattens_tokens():
            out = (x.reshape(-1, shape[0]) @ kernel.reshape(shape[0], -1)).reshape(*x.shape[:-1], *shape[1:])
        else:
            out = jnp.einsum("btd,dhk->bthk", x, kernel)
        return out + bias.astype(self.dtype)


class HeadMerge(nn.Module):
    """``[B, T, heads, kv] -> [B, T, D]`` with kernel ``[heads, kv, D]`` and bias ``[D]``."""

    features: int
    kernel_init: nn.initializers.Initializer
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-2], x.shape[-1], self.features)
        kernel = self.param("kernel", logical(self.kernel_init, "heads", "kv", "embed"), shape)
        bias = self.param("bias", logical(nn.initializers.zeros, "embed"), (self.features,))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if layers.flattens_tokens():
            width = shape[0] * shape[1]
            out = (x.reshape(-1, width) @ kernel.reshape(width, -1)).reshape(*x.shape[:-2], self.features)
        else:
            out = jnp.einsum("bthk,hkd->btd", x, kernel)
        return out + bias.astype(self.dtype)


@jax.custom_vjp
def cpu_attention(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``softmax(q k^T / sqrt(kv) + bias) v``, what ``jax.nn.dot_product_attention`` computes, laid out for XLA CPU.

    ``query``, ``key``, ``value`` ``[B, T, heads, kv]`` -> ``[B, T, heads, kv]``
    in their dtype; ``bias`` ``[heads, T, T]`` or ``[B, heads, T, T]`` (or
    None). Logits, softmax and the softmax gradient are float32 (as
    ``jax.nn.dot_product_attention``'s); probabilities are cast to the value
    dtype for their product with the values.

    Why not ``jax.nn.dot_product_attention`` on the CPU: its ``[B, T, heads, kv]``
    layout makes XLA CPU run the batched products on strided operands, and its
    gradient goes through the softmax's own (two passes over the ``[B, heads,
    T, T]`` probabilities). Here the operands are transposed to ``[B, heads, T,
    kv]`` once, and the gradient is written out the way fused attention kernels
    compute it: ``ds = p * (dp - rowsum(do * o))``, where the row sum is over
    ``kv`` rather than over ``T``. It is markedly faster at both of MAE's
    shapes, timed side by side in ``benchmarks/results/design_choices_cpu.md``
    ("attention").
    """
    return _cpu_attention_fwd(query, key, value, bias)[0]


def _to_heads_first(x):
    return jnp.swapaxes(x, 1, 2)  # [B, T, heads, kv] <-> [B, heads, T, kv]


def _cpu_attention_fwd(query, key, value, bias):
    # The scale goes on q ([B, heads, T, kv]) rather than on the logits: XLA CPU's fused matmul
    # takes a scalar factor on the logits as a materialised [B, heads, T, T] operand.
    scale = 1.0 / math.sqrt(query.shape[-1])
    q, k, v = (_to_heads_first(x) for x in (query, key, value))
    q_scaled = (q.astype(jnp.float32) * scale).astype(q.dtype)
    logits = jnp.einsum("bnth,bnsh->bnts", q_scaled, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    # The softmax written out: jax.nn.softmax's division also makes XLA CPU materialise a
    # broadcast [B, heads, T, T] operand.
    exp = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = exp * (1.0 / jnp.sum(exp, axis=-1, keepdims=True))
    out = jnp.einsum("bnts,bnsh->bnth", probs.astype(v.dtype), v)
    return _to_heads_first(out), (q_scaled, k, v, probs, out, bias)


def _cpu_attention_bwd(residuals, cotangent):
    q_scaled, k, v, probs, out, bias = residuals
    scale = 1.0 / math.sqrt(q_scaled.shape[-1])
    d_out = _to_heads_first(cotangent)
    d_value = jnp.einsum("bnts,bnth->bnsh", probs.astype(v.dtype), d_out)
    d_probs = jnp.einsum("bnth,bnsh->bnts", d_out, v, preferred_element_type=jnp.float32)
    # sum_s p[t, s] dp[t, s] equals sum_h do[t, h] o[t, h]: a [T, kv] product instead of [T, T].
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits = probs * (d_probs - row)
    d_bias = None if bias is None else _sum_to_shape(d_logits, bias.shape).astype(bias.dtype)
    d_logits = d_logits.astype(q_scaled.dtype)
    d_query = jnp.einsum("bnts,bnsh->bnth", d_logits, k, preferred_element_type=jnp.float32) * scale
    d_key = jnp.einsum("bnts,bnth->bnsh", d_logits, q_scaled)
    return _to_heads_first(d_query.astype(q_scaled.dtype)), _to_heads_first(d_key), _to_heads_first(d_value), d_bias


def _sum_to_shape(x, shape):
    """``x`` summed over the axes along which an array of ``shape`` was broadcast to ``x.shape``."""
    x = jnp.sum(x, axis=tuple(range(x.ndim - len(shape))))
    return jnp.sum(x, axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1), keepdims=True)


cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


# The collection in which every ``Attention`` stores its first token's attention probabilities when (and only
# when) an ``apply`` makes it mutable: ``last_block_cls_attention``.
CLS_ATTENTION = "cls_attention"


def cls_attention_probs(query: jax.Array, key: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """The first (cls) token's attention probabilities: ``[B, heads, T] float32``, each row summing to 1.

    ``query``, ``key`` ``[B, T, heads, kv]``; ``bias`` ``[heads, T, T]`` or ``[B, heads, T, T]`` (or None).
    ``softmax(q_0 k^T / sqrt(kv) + bias_0)`` in float32, the cls row of what the attention computes,
    computed on its own so that the attention itself is untouched.
    """
    logits = jnp.einsum(
        "bhk,bthk->bht", query[:, 0].astype(jnp.float32), key.astype(jnp.float32), preferred_element_type=jnp.float32
    ) / math.sqrt(query.shape[-1])
    if bias is not None:
        logits = logits + bias[..., 0, :].astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1)


def last_block_cls_attention(module: nn.Module, variables, *args, **kwargs) -> tuple[jax.Array, jax.Array]:
    """``(module.apply(variables, *args, **kwargs), attention)``: an encoder's output and its last block's
    cls-to-patch attention ``[B, heads, T - 1] float32`` (the cls query over every other key, probabilities
    normalised over all ``T`` keys, the cls key included: DINO's and AMT's map).

    ``module`` is any encoder built on ``Transformer`` (MAE's ``Encoder``, SimMIM's); its outputs and
    numerics are those of a plain ``apply``: the attention layers only add their cls row to the
    ``CLS_ATTENTION`` collection, which this call makes mutable.
    """
    output, collections = module.apply(variables, *args, mutable=[CLS_ATTENTION], **kwargs)
    sown = flax.traverse_util.flatten_dict(flax.core.unfreeze(collections[CLS_ATTENTION]))
    if not sown:
        raise ValueError(f"{type(module).__name__} has no attention layer that records the cls attention.")

    def block_number(path) -> int:
        match = re.search(r"block_(\d+)", "/".join(path))
        return int(match.group(1)) if match else -1

    return output, sown[max(sown, key=block_number)][-1][:, :, 1:]


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections (with bias).

    ``[B, T, D] -> [B, T, D]``. Kernels are ``[D, heads, kv]`` (q, k, v) and
    ``[heads, kv, D]`` (out); the checkpoint tools fuse them into the official
    ``qkv`` / ``proj`` matrices. ``kernel_init`` (None: MAE's xavier-uniform
    with the fused ``qkv``'s fans) initialises all four kernels. When an ``apply`` makes ``CLS_ATTENTION``
    mutable, each call also stores ``cls_attention_probs`` there (``probs``,
    ``[B, heads, T]``); see ``last_block_cls_attention``.
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None  # None / 'auto', 'xla', 'cudnn': see attention_implementation
    kernel_init: nn.initializers.Initializer | None = None

    @nn.compact
    def __call__(self, x, bias=None):
        """``bias``: optional additive logits ``[heads, T, T]`` or ``[B, heads, T, T]`` (a relative position bias)."""
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
        head_dim = width // self.num_heads
        # The official MAE initialises q, k, v as one [3D, D] linear.
        qkv_init = self.kernel_init or xavier_uniform(width, 3 * width)
        qkv_axes = ("batch", "tokens", "heads", "kv")
        query, key, value = (
            nn.with_logical_constraint(
                HeadProjection(self.num_heads, head_dim, qkv_init, self.dtype, name=name)(x), qkv_axes
            )
            for name in ("query", "key", "value")
        )
        if bias is not None:
            bias = bias.astype(query.dtype)
        if self.is_mutable_collection(CLS_ATTENTION) and not self.is_initializing():
            self.sow(CLS_ATTENTION, "probs", cls_attention_probs(query, key, bias))
        backend = jax.default_backend()
        implementation = attention_implementation(
            query.dtype,
            head_dim,
            backend,
            self.attention_impl,
            device_compute_capability() if backend == "gpu" else None,
            odd_length_bias=bias is not None and x.shape[1] % 2 == 1,
        )
        if implementation == "xla" and backend == "cpu":
            attended = cpu_attention(query, key, value, bias)
        else:
            attended = fused_attention(query, key, value, bias, implementation, self.attention_impl == "cudnn")
        attended = nn.with_logical_constraint(attended, qkv_axes)
        out = HeadMerge(width, self.kernel_init or xavier_uniform(width, width), self.dtype, name="out")(attended)
        return nn.with_logical_constraint(out, ("batch", "tokens", "embed"))


def fused_attention(query, key, value, bias, implementation: str, insist: bool) -> jax.Array:
    """``jax.nn.dot_product_attention`` with ``implementation``; ``[B, T, heads, kv]`` in and out.

    jax's cuDNN kernel has shape rules of its own that change between releases
    (jax 0.11 refuses odd sequence lengths when differentiating, 0.10 only with a
    bias), checked when the attention is traced. Unless cuDNN was ``insist``-ed on
    (``attention_impl='cudnn'``), a layer whose shapes jax's cuDNN refuses runs on
    XLA, so 'auto' means cuDNN exactly where the installed jax can run it.
    """
    if implementation != "cudnn" or insist:
        return jax.nn.dot_product_attention(query, key, value, bias, implementation=implementation)
    try:
        return jax.nn.dot_product_attention(query, key, value, bias, implementation="cudnn")
    except NotImplementedError:
        return jax.nn.dot_product_attention(query, key, value, bias, implementation="xla")
