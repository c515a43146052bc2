"""Throughput of a train step: XLA's FLOP count of it, and the devices' peak FLOP/s that MFU divides by.

MFU (model FLOPs utilisation) = achieved FLOP/s per device / the device's dense peak. The FLOPs are
XLA's count of the step as traced (``Lowered.cost_analysis()``: before XLA's optimisations, so the same
count on every backend, the whole global step), divided by the mesh's device count; recomputation under
``model.remat`` is in the traced step, so it counts. XLA counts a loop's body once, whatever its trip
count, so a step in microbatches is counted as the same step on the whole batch (``train.count_step_flops``). The peaks (``PEAKS``) are dense (no 2:4 sparsity)
tensor-unit numbers from the vendors' spec sheets, keyed by ``jax.Device.device_kind``; a device not
listed (every CPU) has no MFU.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Peak:
    """Dense peak TFLOP/s of one device (a GPU, or a TPU chip as JAX counts it: one device) and the source."""

    bf16: float
    f32: float
    source: str


# ``device_kind`` substring -> peak; the first match wins, so a longer name comes before a name it contains.
# GPU float32 is the CUDA cores' rate (XLA's default matmul precision on GPU may use TF32 tensor cores, which
# can exceed it: MFU above 100% in float32 says so). A TPU runs float32 matmuls as bfloat16 passes at default
# precision, so its float32 peak is the bfloat16 one.
PEAKS = (
    ("H100 PCIe", Peak(756.0, 51.0, "NVIDIA H100 Tensor Core GPU datasheet (PCIe: 1,513 sparse BF16, FP32 51)")),
    ("H100 80GB HBM3", Peak(989.0, 67.0, "NVIDIA H100 Tensor Core GPU datasheet (SXM: 1,979 sparse BF16, FP32 67)")),
    ("H200", Peak(989.0, 67.0, "NVIDIA H200 Tensor Core GPU datasheet (SXM: 1,979 sparse BF16, FP32 67)")),
    ("A100", Peak(312.0, 19.5, "NVIDIA A100 Tensor Core GPU datasheet (BF16 312 dense, FP32 19.5)")),
    ("TPU v4", Peak(275.0, 275.0, "Cloud TPU docs, TPU v4 system architecture (275 TFLOPS BF16 per chip)")),
    ("TPU v5 lite", Peak(197.0, 197.0, "Cloud TPU docs, TPU v5e (197 TFLOPS BF16 per chip)")),
    ("TPU v5p", Peak(459.0, 459.0, "Cloud TPU docs, TPU v5p (459 TFLOPS BF16 per chip)")),
    ("TPU v5", Peak(459.0, 459.0, "Cloud TPU docs, TPU v5p (459 TFLOPS BF16 per chip; device_kind 'TPU v5')")),
    ("TPU v6 lite", Peak(918.0, 918.0, "Cloud TPU docs, TPU v6e Trillium (918 TFLOPS BF16 per chip)")),
    ("TPU v6e", Peak(918.0, 918.0, "Cloud TPU docs, TPU v6e Trillium (918 TFLOPS BF16 per chip)")),
)


def peak_flops(device_kind: str, dtype) -> float | None:
    """Dense peak FLOP/s of a device of ``device_kind`` computing in ``dtype`` (bfloat16 or float16: the
    tensor units' half-precision rate; anything else: float32's); None for a device ``PEAKS`` lacks."""
    for name, peak in PEAKS:
        if name.lower() in device_kind.lower():
            half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            return 1e12 * (peak.bf16 if half else peak.f32)
    return None


def flops(cost) -> float | None:
    """The ``flops`` of a ``cost_analysis()`` result; None where XLA gave no count."""
    cost = cost[0] if isinstance(cost, list) else cost  # one dict per program in older jax
    return float(cost["flops"]) if cost and cost.get("flops") else None


def utilisation(step_flops: float | None, devices: int, step_seconds: float, peak: float | None) -> dict:
    """``{'tflops_per_device': ..., 'mfu': ...}`` of a step of ``step_flops`` (the global step's) on ``devices``
    devices taking ``step_seconds``; ``mfu`` (a fraction) only where ``peak`` is known, neither without a count."""
    if not step_flops:
        return {}
    achieved = step_flops / devices / step_seconds
    return {"tflops_per_device": achieved / 1e12} | ({"mfu": achieved / peak} if peak else {})
