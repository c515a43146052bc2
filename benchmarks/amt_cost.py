"""AMT's cost: its periodic attention-map pass against a training epoch, and the storage of its maps.

    python benchmarks/amt_cost.py --out benchmarks/results/amt_cost_cpu

Measured (seconds, on this machine): the README's main job (``configs/pretrain_fmnist.py``: Fashion-MNIST,
28x28 images at patch 2, the 14x14 grid, a width-128 depth-4 ViT with a 128 x 2 decoder, batch 128) trained
as MAE + PR-MIM with the ``amt`` sampler at rho_d 0.5: the median time of a training step once the maps are
in use (host sampling included: the map lookup, ``crop_maps`` and the multinomial draw), times the steps
of an epoch, against the wall time of one map pass over the 60000 training images
(``AttentionMaps.refresh``, its compilation excluded). Counted (XLA's
``cost_analysis``, which does not drift): FLOPs per image of the pass and of the train step, for the
main job's model and for ViT-B/16 at 224 (the paper's Table 6 model). Storage: the maps' bytes per image
and for ImageNet-1K at 14x14, and the checkpoint's ``host/`` file.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pathlib
import platform
import statistics
import time

import jax
import ml_collections
import numpy as np

from prmim_jax import attention_maps, masking_transforms, methods, sharding, train
from prmim_jax.data import pipeline
from prmim_jax.models import attention as attention_lib
from prmim_jax.tools import cost

ROOT = pathlib.Path(__file__).parent.parent
IMAGENET_TRAIN_IMAGES = 1281167


def main_job_config() -> ml_collections.ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_fmnist", ROOT / "configs" / "pretrain_fmnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("method=prmim,sampler=amt")
    config.total_steps = 100000  # only sizes AMT's schedule: the pass runs after every epoch from the first
    config.method.update(amt_warmup_epochs=0, amt_interval=1)
    config.evals = ml_collections.ConfigDict()
    return config


def pass_flops_per_image(method, batch: int) -> float:
    """XLA's FLOPs of AMT's map pass (the encoder on every token, cls attention, normalised maps) per image."""
    encoder, _ = method.encoder()
    state, _ = cost.abstract_inputs(method, batch)
    _, params = method.encoder(state.variables.params)
    # Normalised float images (normalize passes them through): the count is the encoder's, whatever the data.
    images = jax.ShapeDtypeStruct((batch, *method.model.image_size, method.model.channels), np.float32)
    grid = method.layout.grid

    def maps(params, images):
        attention = attention_lib.last_block_cls_attention(encoder, {"params": params}, method.normalize(images))
        return attention_maps.pass_maps(attention[1], grid)

    return jax.jit(maps).lower(params, images).compile().cost_analysis()["flops"] / batch


def counted(model_config, section: dict, batch: int) -> dict:
    method = cost.build_method("mae", model_config, section)
    step = cost.measure(method, batch)
    flops = pass_flops_per_image(method, batch)
    return {"pass_flops": flops, "step_flops": step["step_flops"], "pass_over_step": flops / step["step_flops"]}


def measured(config: ml_collections.ConfigDict, steps: int) -> dict:
    """Wall times of the main job: training steps with the maps in use, and one map pass."""
    setup = train.validate(config)
    rng = jax.random.key(0)
    init_fn, _, shardings = train.abstract_state(setup, config, rng)
    state = train.create_state(setup, init_fn, shardings, rng)
    step_fn, batch_sharding = train.compile_train_step(setup, shardings)
    maps = setup.method.host_state(setup.placement, setup.global_batch)
    _, encoder_params = setup.method.encoder(state.params)
    images = np.zeros((setup.global_batch, *setup.method.model.image_size, setup.method.model.channels), np.uint8)
    with setup.placement.active():  # compiles the pass, outside the timing
        jax.block_until_ready(maps._pass(encoder_params, sharding.global_batch(images, batch_sharding)))
    start = time.perf_counter()
    print(maps.refresh(maps.steps[0], state.params), flush=True)
    pass_seconds = time.perf_counter() - start
    iterator = iter(pipeline.train_dataset(config.data, setup.method.host, global_batch=setup.global_batch))
    furthest = masking_transforms.SampleTokens("furthest", maps.layout)
    step_times, amt_host, furthest_host = [], [], []
    for step in range(steps + 1):
        host_batch = next(iterator)
        start = time.perf_counter()
        furthest.map(dict(host_batch))
        furthest_host.append(time.perf_counter() - start)
        start = time.perf_counter()
        batch = maps.sample(host_batch)
        amt_host.append(time.perf_counter() - start)
        state, metrics = step_fn(state, sharding.global_batch(batch, batch_sharding), jax.random.key(step))
        jax.block_until_ready(metrics)
        step_times.append(time.perf_counter() - start)
    step_seconds = statistics.median(step_times[1:])  # the first step compiles
    steps_per_epoch = math.ceil(maps.num_examples / setup.global_batch)
    buffer = io.BytesIO()
    np.savez(buffer, **maps.state_dict())
    return {
        "images": maps.num_examples,
        "global_batch": setup.global_batch,
        "steps_per_epoch": steps_per_epoch,
        "step_seconds": step_seconds,
        "epoch_seconds": step_seconds * steps_per_epoch,
        "pass_seconds": pass_seconds,
        "pass_over_epoch": pass_seconds / (step_seconds * steps_per_epoch),
        "amt_host_sampling_ms_per_batch": 1000 * statistics.median(amt_host[1:]),
        "furthest_host_sampling_ms_per_batch": 1000 * statistics.median(furthest_host[1:]),
        "checkpoint_bytes": buffer.getbuffer().nbytes,
    }


def storage(grid=(14, 14)) -> dict:
    per_image = math.prod(grid) * np.dtype(attention_maps.MAP_DTYPE).itemsize
    return {"grid": list(grid), "bytes_per_image": per_image, "imagenet_1k_bytes": per_image * IMAGENET_TRAIN_IMAGES}


def markdown(result: dict) -> str:
    m, fm, b, s = result["measured"], result["counted_main_job"], result["counted_vit_b"], result["storage"]
    amt_passes = len(
        attention_maps.refresh_steps(IMAGENET_TRAIN_IMAGES, 4096, math.ceil(400 * IMAGENET_TRAIN_IMAGES / 4096), 40, 40)
    )
    lines = [
        "# AMT's cost: the attention-map pass and the maps' storage",
        "",
        f"Command: `{result['command']}` ({result['machine']}, load average {result['load_average']}).",
        "",
        "## Time of one map pass against a training epoch (measured)",
        "",
        f"The main job's model (`configs/pretrain_fmnist.py`: {m['images']} Fashion-MNIST images at 28x28, patch 2, "
        "14x14 tokens, width-128 depth-4 ViT, 128 x 2 decoder), MAE + PR-MIM with `sampler=amt`, rho_e 0.75, "
        f"rho_d 0.5, batch {m['global_batch']}, float32, XLA CPU on 2 shared cores.",
        "",
        "| | seconds |",
        "|---|---|",
        f"| training step (median; host sampling included) | {m['step_seconds']:.3f} |",
        f"| training epoch ({m['steps_per_epoch']} steps) | {m['epoch_seconds']:.1f} |",
        f"| one map pass over the {m['images']} images (compiled) | {m['pass_seconds']:.1f} |",
        f"| **pass / epoch** | **{m['pass_over_epoch']:.2f}** |",
        "",
        f"Host sampling per batch of {m['global_batch']}: `amt` (map lookup, crop, multinomial draw) "
        f"{m['amt_host_sampling_ms_per_batch']:.1f} ms, `furthest` {m['furthest_host_sampling_ms_per_batch']:.1f} ms.",
        "",
        "## FLOPs per image (XLA's count)",
        "",
        "| model | map pass | train step | pass / step |",
        "|---|---|---|---|",
        f"| main job (width 128, 14x14) | {fm['pass_flops'] / 1e6:.1f} M | {fm['step_flops'] / 1e6:.1f} M "
        f"| {fm['pass_over_step']:.2f} |",
        f"| ViT-B/16 at 224, MAE + PR-MIM rho_d 0.5 | {b['pass_flops'] / 1e9:.1f} G | {b['step_flops'] / 1e9:.1f} G "
        f"| {b['pass_over_step']:.2f} |",
        "",
        "A pass costs `pass / step` of a training epoch's arithmetic. AMT's ImageNet schedule (400 epochs, "
        f"a pass after epochs 40, 80, ..., 360) runs {amt_passes} passes: "
        f"{amt_passes * b['pass_over_step']:.1f} epochs' worth at ViT-B, "
        f"{100 * amt_passes * b['pass_over_step'] / 400:.1f}% on top of the 400.",
        "",
        "## Storage",
        "",
        f"float16 maps at {s['grid'][0]}x{s['grid'][1]}: {s['bytes_per_image']} bytes per image; ImageNet-1K "
        f"({IMAGENET_TRAIN_IMAGES} training images): {s['imagenet_1k_bytes'] / 1e6:.0f} MB "
        f"({s['imagenet_1k_bytes'] / 2**20:.0f} MiB), held on the hosts (split over the processes) and written "
        f"with every checkpoint. The main job's checkpoint file: {m['checkpoint_bytes'] / 1e6:.1f} MB.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--vit_b_batch", type=int, default=8)
    parser.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    config = main_job_config()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    section = dict(reconstruction="progressive", sampler="amt", throw_ratio=0.5)
    vit_b = methods.registration("mae").model(None)  # MAE's ViT-B/16
    result = {
        "command": "python benchmarks/amt_cost.py --out " + args.out,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})",
        "storage": storage(),
        "counted_main_job": counted(config.model, section, 64),
        "counted_vit_b": counted(vit_b, section, args.vit_b_batch),
    }
    print(json.dumps(result, indent=1), flush=True)
    result["load_average"] = round(os.getloadavg()[0], 2)
    result["measured"] = measured(config, args.steps)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
