"""The MAE train step in PyTorch: transformers' ``ViTMAEForPreTraining``, the baseline of the device check.

    python benchmarks/torch_mae.py --batch 256                       # ViT-B/16 at 224 on the GPU
    python benchmarks/torch_mae.py --smoke                           # tiny shapes on the CPU, seconds

One step is what a PyTorch user would write for speed: the forward pass under
``torch.autocast`` (bfloat16), attention through SDPA (``attn_implementation
='sdpa'``, flash or memory-efficient kernels on a GPU), the model wrapped in
``torch.compile``, the loss (``norm_pix_loss``, mask ratio 0.75) backpropagated
and a fused AdamW update (betas 0.9 / 0.95, weight decay 0.05, as MAE). The
model draws its own masking noise on the device, as transformers' model does.

Reported: images/s (the median over ``--rounds`` rounds of ``--steps`` steps,
after warm-up steps that include the compilation), the first step's seconds
(compilation included), the number of graph breaks Dynamo reported, and the
peak memory PyTorch's allocator held.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import time

import numpy as np
import torch
import transformers

# ViT-B/16 at 224 with MAE's decoder (512 wide, 8 deep, 16 heads).
VIT_B16 = dict(
    image_size=224, patch_size=16, width=768, depth=12, heads=12, decoder_width=512, decoder_depth=8, decoder_heads=16
)
# The same structure at a size that runs in seconds on a CPU.
SMOKE = dict(
    image_size=32, patch_size=4, width=32, depth=1, heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2
)
MASK_RATIO = 0.75


def vit_mae(shape: dict) -> transformers.ViTMAEForPreTraining:
    """``ViTMAEForPreTraining`` with random weights for ``shape`` (keys of ``VIT_B16``), in training mode."""
    config = transformers.ViTMAEConfig(
        image_size=shape["image_size"],
        patch_size=shape["patch_size"],
        num_channels=3,
        hidden_size=shape["width"],
        num_hidden_layers=shape["depth"],
        num_attention_heads=shape["heads"],
        intermediate_size=4 * shape["width"],
        decoder_hidden_size=shape["decoder_width"],
        decoder_num_hidden_layers=shape["decoder_depth"],
        decoder_num_attention_heads=shape["decoder_heads"],
        decoder_intermediate_size=4 * shape["decoder_width"],
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        mask_ratio=MASK_RATIO,
        norm_pix_loss=True,
        attn_implementation="sdpa",
    )
    return transformers.ViTMAEForPreTraining(config).train()


def measure(shape: dict, batch: int, steps: int, rounds: int, backend: str, device: str, warmup: int = 3) -> dict:
    """Times the train step; ``backend`` is ``torch.compile``'s ('inductor', 'aot_eager') or 'none' (eager)."""
    torch.manual_seed(0)
    model = vit_mae(shape).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    forward = model if backend == "none" else torch.compile(model, backend=backend)
    images = torch.randn(batch, 3, shape["image_size"], shape["image_size"], device=device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = forward(pixel_values=images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    torch._dynamo.utils.counters.clear()
    warmup_seconds = []
    for _ in range(warmup):
        start = time.perf_counter()
        loss = step()
        synchronize()
        warmup_seconds.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {float(loss)} after {warmup} steps")
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize()
        seconds.append((time.perf_counter() - start) / steps)
    step_seconds = float(np.median(seconds))
    return {
        "batch": batch,
        "images_per_second": batch / step_seconds,
        "step_seconds": step_seconds,
        "first_step_seconds": warmup_seconds[0],
        "graph_breaks": int(sum(torch._dynamo.utils.counters["graph_break"].values())),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "compile_backend": backend,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def measure_fitting(shape: dict, batch: int, steps: int, rounds: int, backend: str, device: str) -> dict:
    """``measure`` at ``batch``, halving it while the GPU runs out of memory (the result says which batch ran)."""
    while True:
        try:
            return measure(shape, batch, steps, rounds, backend, device)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        # Out of the handler, so the failed attempt's tensors are free to go.
        batch //= 2
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, 'aot_eager' compilation")
    parser.add_argument("--shape", default=None, help="JSON dict of VIT_B16's keys (default: ViT-B/16)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--backend", default=None, help="torch.compile backend, or 'none'")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    smoke = args.smoke
    shape = json.loads(args.shape) if args.shape else (SMOKE if smoke else VIT_B16)
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    # Inductor's CPU code generation takes minutes on a small machine; 'aot_eager' still traces the model
    # with Dynamo and AOTAutograd, where a transformers or torch change would break first.
    backend = args.backend or ("aot_eager" if smoke or device == "cpu" else "inductor")
    result = measure_fitting(
        shape,
        args.batch or (2 if smoke else 256),
        args.steps or (1 if smoke else 10),
        args.rounds or (1 if smoke else 3),
        backend,
        device,
    )
    result["shape"] = shape
    print(json.dumps(result, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
