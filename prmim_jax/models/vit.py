"""Vision Transformer pieces shared by the MAE encoder, decoder and classifiers.

Every parameter and activation names logical axes only; the mapping to mesh
axes lives in config (``prmim_jax.sharding``). Logical names used here:

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
- Attention: the logits are accumulated in float32, the softmax (and its
  gradient) is float32, and the probabilities are cast to bfloat16 for the
  product with the values. That is what ``jax.nn.dot_product_attention``'s XLA
  path does (``BF16_BF16_F32``), what cuDNN's fused kernel does with its
  softmax statistics, and what ``cpu_attention`` (XLA on the CPU) does.
- LayerNorm computes its statistics, the normalisation and the affine map in
  float32 (flax promotes to float32) and emits bfloat16: every consumer is a
  bfloat16 matmul that would round its input to bfloat16 anyway, so the values
  are identical either way, and XLA fuses the cast into the norm (measured on
  XLA CPU, ViT-B/16: the same temporary memory and bytes accessed).
- The residual stream is float32 (``residual_dtype``): each block adds its
  bfloat16 branch outputs to a float32 sum, so 24 (ViT-B) to 64 (ViT-H)
  additions do not round at bfloat16's 8 bits. Its cost is the residual
  copies kept for the backward pass; see ``residual_dtype``.
- Heads and losses are float32: MAE's decoder norm and pixel head, the
  classifier's ``fc_norm`` and head, and the losses (``prmim_jax.models.mae``,
  ``prmim_jax.models.classifier``).

Attention implementation (``attention_impl``): ``None`` / ``'auto'`` picks
cuDNN's fused kernel on a CUDA GPU when the dtype is bfloat16 or float16 and
the head width is supported (ViT-B's 64 and the MAE decoder's 32 are), and XLA
everywhere else (CPU, TPU, float32); ``'xla'`` and ``'cudnn'`` force one, and
``'cudnn'`` where it cannot run is a ``ValueError`` naming the fix, raised
when the model is built. The rule is ``attention_implementation``. On the
CPU backend the XLA path is ``cpu_attention`` (the same function, laid out
for XLA CPU).

Rematerialisation (``remat``): ``'none'`` keeps every activation for the
backward pass; ``'dots_saveable'`` keeps only matmul outputs of each block and
recomputes the rest (norms, GELU, softmax); ``'full'`` keeps only each block's
input and recomputes the whole block. Gradients are unchanged (to float32
rounding); the activations kept for the backward pass shrink (``full``: 6% of
``none``'s at MAE's decoder shape) for a longer backward pass (large batches,
ViT-L/H). XLA CPU's compiled temporary memory barely moves with it (measured:
200 / 197 / 198 MiB, 8 blocks of width 128, 197 tokens, batch 8); it is for
accelerators. See ``remat_block``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prmim_jax.models import tokens

LAYER_NORM_EPS = 1e-6

ATTENTION_IMPLS = (None, "auto", "xla", "cudnn")
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
REMAT_POLICIES = ("none", "dots_saveable", "full")

# name -> (width, depth, heads), the ViT paper's and MAE's sizes; mlp is 4 x width.
VIT_SIZES = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}


@dataclasses.dataclass(frozen=True)
class VitSize:
    width: int
    depth: int
    num_heads: int
    patch_size: int


def parse_variant(variant: str) -> VitSize:
    """``'B/16'`` -> ``VitSize(768, 12, 12, 16)``; any patch size, sizes of ``VIT_SIZES``."""
    match = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)", variant)
    if not match:
        raise ValueError(
            f"unknown ViT variant {variant!r}; expected one of {sorted(VIT_SIZES)} '/' patch size, e.g. 'B/16'."
        )
    width, depth, heads = VIT_SIZES[match.group(1)]
    return VitSize(width, depth, heads, int(match.group(2)))


def encoder_size(config) -> VitSize:
    """The encoder size of a model config: ``variant`` with any ``width`` / ``depth`` / ``num_heads`` /
    ``patch_size`` override; raises ``ValueError`` (with the fix) when it cannot tile ``image_size``."""
    size = parse_variant(config.variant)
    size = VitSize(
        config.get("width") or size.width,
        config.get("depth") or size.depth,
        config.get("num_heads") or size.num_heads,
        config.get("patch_size") or size.patch_size,
    )
    image_size = config.image_size
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if image_size[0] % size.patch_size or image_size[1] % size.patch_size:
        raise ValueError(
            f"image_size {image_size} is not a multiple of patch_size {size.patch_size}; change one of them."
        )
    if size.width % size.num_heads or size.width % 4:
        raise ValueError(
            f"width={size.width} must be divisible by its number of heads ({size.num_heads}) and by 4 (2-D sin-cos table)."
        )
    return size


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """``[M, embed_dim] float64``: ``[sin(pos * w) | cos(pos * w)]``, ``w_i = 10000^(-2i / embed_dim)``."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}.")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid: tuple[int, int], with_cls: bool = True) -> np.ndarray:
    """The official MAE's fixed 2-D position table.

    Args:
      embed_dim: width, a multiple of 4.
      grid: ``(rows, cols)`` of the token grid.
      with_cls: prepend an all-zero row for the cls token.

    Returns:
      ``[(1 if with_cls) + rows * cols, embed_dim] float32``: row-major tokens,
      each ``[sin(col) | cos(col) | sin(row) | cos(row)]``, computed in float64.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {embed_dim}.")
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    table = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
    if with_cls:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return table.astype(np.float32)


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

    Its cost, measured on XLA CPU's compiled ViT-B/16 MAE train step in
    bfloat16 at batch 64: the same temporary memory as a bfloat16 stream
    (10.8 GB either way) and 2.4% more bytes accessed (98.0 against 95.8 GB).
    XLA CPU computes bfloat16 arithmetic in float32 (the float32 step needs
    less temporary memory there, 9.9 GB), so the GPU check is the one that
    sizes this choice on an accelerator.
    """
    return jnp.promote_types(dtype, jnp.float32)


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


def check_model_options(dtype, head_dims: tuple[int, ...], attention_impl: str | None, remat: str) -> None:
    """Raise ``ValueError`` (naming the fix) for an ``attention_impl`` / ``remat`` that cannot run, before compiling.

    ``head_dims``: the head width of every attention stack of the model (MAE:
    encoder and decoder).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose one of {REMAT_POLICIES}.")
    backend = jax.default_backend()
    capability = device_compute_capability() if attention_impl == "cudnn" else None
    for head_dim in head_dims:
        attention_implementation(dtype, head_dim, backend, attention_impl, capability)


def flattens_tokens() -> bool:
    """Whether linear layers multiply ``[..., D]`` activations as one ``[M, D]`` matrix (the CPU backend).

    Why: XLA CPU lowers a weight gradient that contracts two or more axes
    (``[B, T, D]`` activations against ``[B, T, F]`` output gradients) as a
    transposed copy of an operand and a slower general contraction; a single
    contracted axis reaches its fast matrix-product path. Measured (one core,
    float32, fwd + bwd, ``benchmarks/results/cpu_components.md``): MAE's decoder
    block 367 -> 321 ms, the whole ViT-B MAE step from 1.31x PyTorch's time
    to 1.15x (``cpu_side_by_side.md``). The reshapes are free, and the
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
        if flattens_tokens():
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
        if flattens_tokens():
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
    ``kv`` rather than over ``T``. Measured side by side (one core, fwd + bwd,
    batch 8): 127 -> 83 ms at MAE's decoder (197 tokens, 16 heads of 32),
    5.6 -> 3.9 ms at the ViT-B encoder's 50 visible tokens (12 heads of 64).
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


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, ``x * (1 + erf(x / sqrt(2))) / 2``, written as PyTorch's ``nn.GELU()`` computes it.

    ``jax.nn.gelu(approximate=False)`` computes the same function as
    ``x * erfc(-x / sqrt(2)) / 2``; XLA CPU's ``erfc`` costs more than its
    ``erf``, and its gradient divides by ``sqrt(2)``, which XLA CPU keeps as a
    division it will not fuse twice. Measured at MAE's decoder MLP (one core,
    fwd + bwd of fc1-GELU-fc2): 198 -> 178 ms. The two agree to float32
    rounding; ``erf`` loses relative accuracy only where GELU's output is
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


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block`` as used by MAE): ``[B, T, D] -> [B, T, D]``.

    ``drop_path`` > 0 drops each residual branch for a whole example with that
    probability while training (stochastic depth), scaling kept ones by
    ``1 / (1 - drop_path)``; it needs the ``'dropout'`` rng unless ``deterministic``.

    ``layer_scale_init`` (CaiT / BEiT layer scale, as SimMIM's ViT uses): when
    set, each residual branch is multiplied by a learned per-channel vector
    (``layer_scale_attn``, ``layer_scale_mlp`` ``[D]``, the official
    ``gamma_1`` / ``gamma_2``) that starts at this value; ``None`` adds no
    parameter. ``attention_bias`` is ``Attention``'s ``bias``.
    """

    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    drop_path: float = 0.0
    layer_scale_init: float | None = None

    def layer_scale(self, name: str, branch):
        if self.layer_scale_init is None:
            return branch
        gamma = self.param(name, logical(nn.initializers.constant(self.layer_scale_init), "embed"), (branch.shape[-1],))
        return branch * gamma.astype(self.dtype)

    @nn.compact
    def __call__(self, x, deterministic: bool = True, attention_bias=None):
        # One keep/drop decision per example: broadcast over tokens and width.
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=deterministic or not self.drop_path)
        attended = Attention(self.num_heads, self.dtype, self.attention_impl, name="attn")(
            layer_norm(self.dtype, "norm1")(x), attention_bias
        )
        x = x + drop(self.layer_scale("layer_scale_attn", attended))
        mlp_out = MlpBlock(self.mlp_dim, self.dtype, name="mlp")(layer_norm(self.dtype, "norm2")(x))
        x = x + drop(self.layer_scale("layer_scale_mlp", mlp_out))
        return nn.with_logical_constraint(x, ("batch", "tokens", "embed"))


class Transformer(nn.Module):
    """``depth`` blocks, then a final LayerNorm when ``final_norm``: ``[B, T, D] -> [B, T, D]``.

    Block ``i`` drops its branches with ``drop_path_rate * i / (depth - 1)``
    (MAE's linear rule). ``frozen_blocks = k`` stops gradients below block
    ``k``: the embeddings and the first ``k`` blocks get none (partial
    fine-tuning and linear probing skip their backward pass).
    ``layer_scale_init`` is ``Block``'s; ``attention_bias`` (``[heads, T, T]``
    or ``[B, heads, T, T]``) is added to every block's attention logits, one
    array shared by all blocks (SimMIM's shared relative position bias).
    The blocks carry the residual stream in ``residual_dtype(dtype)`` (float32
    under bfloat16) and are rematerialised by ``remat`` (``remat_block``).

    ``taps`` (block indices counted from 0): when not None, the call returns
    ``(output, tapped)``, ``tapped`` the residual stream after each of those
    blocks in the order given, before any norm (frameworks that read
    intermediate blocks: LocalMIM's levels, MFF's fusion).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    final_norm: bool = True
    drop_path_rate: float = 0.0
    frozen_blocks: int = 0
    layer_scale_init: float | None = None
    remat: str = "none"
    taps: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True, attention_bias=None):
        x = x.astype(residual_dtype(self.dtype))
        block_class = remat_block(self.remat)
        if self.taps is not None and not all(0 <= i < self.depth for i in self.taps):
            raise ValueError(f"taps={self.taps} must be block indices in [0, {self.depth}).")
        tapped = {}
        for i in range(self.depth):
            if i == self.frozen_blocks and i:
                x = jax.lax.stop_gradient(x)
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            block = block_class(
                self.num_heads,
                self.mlp_dim,
                self.dtype,
                self.attention_impl,
                rate,
                layer_scale_init=self.layer_scale_init,
                name=f"block_{i}",
            )
            x = block(x, deterministic, attention_bias)
            x = residual_boundary(x)
            tapped[i] = x
        if self.frozen_blocks >= self.depth:
            x = jax.lax.stop_gradient(x)
        out = layer_norm(self.dtype, "norm")(x) if self.final_norm else x
        return out if self.taps is None else (out, tuple(tapped[i] for i in self.taps))


# ``deterministic`` (argument 2, counting the module as 0) decides drop path at trace time.
_REMAT_BLOCKS = {
    "none": Block,
    "dots_saveable": nn.remat(Block, static_argnums=(2,), policy=jax.checkpoint_policies.dots_saveable),
    "full": nn.remat(Block, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable),
}


def remat_block(remat: str) -> type[Block]:
    """``Block``, rematerialised by policy ``remat`` (one of ``REMAT_POLICIES``).

    ``'none'``: plain ``Block``. ``'dots_saveable'``: ``nn.remat`` keeping
    the outputs of the block's matmuls (``jax.checkpoint_policies.dots_saveable``,
    the attention logits included) and recomputing norms, GELU and softmax in
    the backward pass. ``'full'``: keeping nothing but the block's input and
    recomputing the block. Parameter names and values are those of ``Block``.
    """
    if remat not in _REMAT_BLOCKS:
        raise ValueError(f"remat={remat!r}; choose one of {REMAT_POLICIES}.")
    return _REMAT_BLOCKS[remat]


@jax.custom_vjp
def residual_boundary(x: jax.Array) -> jax.Array:
    """The identity on the residual stream between two blocks; on XLA CPU its gradient is stored once.

    Why: the gradient of the residual stream is a chain of additions through
    every block's backward pass (each LayerNorm adds its input gradient).
    XLA CPU's fusion duplicates cheap elementwise producers into every
    consumer, so each block's weight-gradient transposes recomputed the whole
    chain from the loss down to that block, reading the saved activations of
    all later blocks in transposed order: at ViT-B/16 (MAE, batch 8) these
    fusions took a third of the train step, growing with depth squared. A
    conditional is an op XLA never fuses across, so passing the gradient
    through one (both branches the identity) makes XLA compute it once per
    block. Off the CPU backend (a GPU conditional would wait for its
    predicate on the host) the gradient passes through untouched.
    """
    return x


def _residual_boundary_fwd(x):
    return x, None


def _residual_boundary_bwd(_, cotangent):
    if jax.default_backend() != "cpu":
        return (cotangent,)
    # The second branch is written ``g * 1`` so that the two branches are not merged (and the
    # conditional removed) before fusion; either is the identity, whatever the predicate.
    predicate = cotangent.reshape(-1)[0] >= 0
    return (jax.lax.cond(predicate, lambda g: g, lambda g: g * 1, cotangent),)


residual_boundary.defvjp(_residual_boundary_fwd, _residual_boundary_bwd)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """``[B, H, W, C] -> [B, N, p * p * C]``, row-major tokens, pixels in the official ``(p, q, c)`` order."""
    batch, height, width, channels = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}.")
    rows, cols = height // patch_size, width // patch_size
    x = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int]) -> jax.Array:
    """Inverse of ``patchify``: ``[B, N, p * p * C] -> [B, H, W, C]``."""
    batch = patches.shape[0]
    channels = patches.shape[-1] // (patch_size * patch_size)
    x = patches.reshape(batch, grid[0], grid[1], patch_size, patch_size, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(batch, grid[0] * patch_size, grid[1] * patch_size, channels)


class Encoder(nn.Module):
    """MAE's ViT encoder over the visible tokens.

    ``images [B, H, W, C]``, ``ids_visible [B, N_vis] int32`` (or ``None`` for
    every token) -> ``[B, 1 + N_vis, width]``: the cls token then the visible
    tokens in the order of ``ids_visible``, after the final LayerNorm (unless
    ``final_norm`` is False). Patches are gathered before the embedding, which
    equals MAE's embed-then-mask.

    Pretraining keeps the 2-D sin-cos position table fixed. Fine-tuning
    (``learned_pos_embedding``) makes it a parameter ``pos_embedding [1 + N,
    width]``, initialised with the table, as MAE's fine-tuning ViT does;
    ``drop_path_rate``, ``frozen_blocks`` and ``remat`` are ``Transformer``'s.
    Under bfloat16 the patch embedding's matmul is bfloat16 and the position
    table is added in the float32 residual stream; the output is the final
    LayerNorm's, bfloat16 (float32 residual stream when ``final_norm`` is False).
    ``taps`` is ``Transformer``'s: with it the call returns ``(output, tapped)``.
    ``cls_token_mlp`` (TEC's input adaptor): the cls token passes through an
    MLP (``D -> 4D -> D``, parameters ``cls_token_mlp``) before its position
    is added; its output depends on the parameters only, so an encoder without
    it computes the same with the MLP's output as its cls token
    (``models.tec.fold_cls_token_mlp``).
    """

    patch_size: int
    image_size: tuple[int, int]
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    final_norm: bool = True
    learned_pos_embedding: bool = False
    drop_path_rate: float = 0.0
    frozen_blocks: int = 0
    remat: str = "none"
    taps: tuple[int, ...] | None = None
    cls_token_mlp: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @nn.compact
    def __call__(self, images, ids_visible=None, deterministic: bool = True):
        if tuple(images.shape[1:3]) != tuple(self.image_size):
            raise ValueError(f"images are {images.shape[1:3]}; the model was built for {self.image_size}.")
        patches = patchify(images, self.patch_size)
        pos = jnp.asarray(sincos_2d(self.width, self.grid))
        if self.learned_pos_embedding:
            pos = self.param("pos_embedding", logical(lambda *_: pos, None, "embed"), pos.shape)
        pos_cls, pos_tokens = pos[:1], pos[1:]
        pos_tokens = jnp.broadcast_to(pos_tokens, (patches.shape[0], *pos_tokens.shape))
        if ids_visible is not None:
            patches = tokens.take(patches, ids_visible)
            pos_tokens = tokens.take(pos_tokens, ids_visible)
        patch_dim = patches.shape[-1]
        # The official MAE initialises the Conv2d patch embedding's weight as a linear
        # and leaves its bias at PyTorch's Conv2d default, U(+-1/sqrt(fan_in)).
        x = FlatDense(
            self.width,
            dtype=self.dtype,
            kernel_init=logical(xavier_uniform(patch_dim, self.width), "patch", "embed"),
            bias_init=logical(uniform_init(1.0 / math.sqrt(patch_dim)), "embed"),
            name="patch_embed",
        )(patches.astype(self.dtype))
        stream = residual_dtype(self.dtype)
        x = x.astype(stream) + pos_tokens.astype(stream)
        cls_token = self.param(
            "cls_token", logical(nn.initializers.normal(0.02), None, None, "embed"), (1, 1, self.width)
        )
        if self.cls_token_mlp:
            # Per example, so that the MLP's activations carry the batch axis like every other.
            cls_token = jnp.broadcast_to(cls_token, (x.shape[0], 1, self.width))
            cls_token = MlpBlock(4 * self.width, self.dtype, name="cls_token_mlp")(cls_token)
        cls_token = jnp.broadcast_to(cls_token + pos_cls, (x.shape[0], 1, self.width)).astype(stream)
        x = nn.with_logical_constraint(jnp.concatenate([cls_token, x], axis=1), ("batch", "tokens", "embed"))
        return Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.dtype,
            self.attention_impl,
            self.final_norm,
            self.drop_path_rate,
            self.frozen_blocks,
            remat=self.remat,
            taps=self.taps,
            name="transformer",
        )(x, deterministic)


def interpolate_pos_embedding(table: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> jax.Array:
    """A position table for another token grid (fine-tuning at another resolution than pretraining).

    ``table [1 + rows * cols, D]`` (cls row first) -> ``[1 + new_rows * new_cols, D]``:
    the cls row is kept, the grid rows are resized bicubically as images of
    ``D`` channels (MAE's ``interpolate_pos_embed``; jax's cubic kernel is Keys'
    a = -0.5 where PyTorch's is -0.75, so values differ slightly from MAE's).
    """
    if table.shape[0] != 1 + old_grid[0] * old_grid[1]:
        raise ValueError(f"position table of {table.shape[0]} rows does not fit the grid {old_grid} plus cls.")
    if tuple(old_grid) == tuple(new_grid):
        return table
    grid = table[1:].reshape(*old_grid, table.shape[-1])
    resized = jax.image.resize(grid, (*new_grid, table.shape[-1]), method="cubic", antialias=False)
    return jnp.concatenate([table[:1], resized.reshape(-1, table.shape[-1]).astype(table.dtype)], axis=0)
