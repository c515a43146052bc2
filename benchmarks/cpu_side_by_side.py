"""Our MAE train step against transformers' ``ViTMAEForPreTraining`` (PyTorch) on this machine's CPU, float32.

    taskset -c 0 python benchmarks/cpu_side_by_side.py --threads 1 --rounds 9 --out benchmarks/results/cpu_side_by_side
    python benchmarks/cpu_side_by_side.py --threads 2 --rounds 7 --out benchmarks/results/cpu_side_by_side.2threads
    python benchmarks/cpu_side_by_side.py --smoke   # tiny shapes, seconds: checks the script runs

What a new user would try: ViT-B/16 at 224, decoder 512 x 8, batch 8, one
train step = forward + backward + AdamW, float32 on the CPU. Four contestants:

- ``transformers_mae``: Hugging Face ``ViTMAEForPreTraining`` with its default
  attention (``sdpa``), mask ratio 0.75, ``norm_pix_loss``, ``torch.optim.AdamW``
  (betas 0.9 / 0.95, weight decay 0.05); it draws its own masking noise.
- ``ours_mae``, ``ours_partial``, ``ours_prmim``: the trainer's step (gradient
  of the method's objective, then the pretraining AdamW of ``optim``) under
  ``jax.jit`` with the state donated; partial and PR-MIM at ``rho_d = 0.5``
  with furthest sampling. The token ids come from the host as in training
  (sampling is the data pipeline's work, not the step's).

The machine is shared, so the contestants run in interleaved rounds (each
round times ``--steps`` steps of every contestant in turn) and the report
gives medians, and each ratio as the median over rounds of that round's
ratio, which machine noise moves much less than absolute times. Both wall
time and the process's CPU time are recorded: with ``--threads 1`` under
``taskset -c 0`` no thread of either framework waits spinning, so CPU time
measures work done even when other processes share the core. XLA's FLOP
count and temporary memory of our compiled steps are reported too: they do
not drift.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import flax.linen as nn
import jax
import numpy as np
import torch
import transformers
from flax.training import train_state

from prmim_jax import masking, optim
from prmim_jax.models import mae as mae_lib

FULL = dict(variant="B/16", image_size=224, decoder_width=512, decoder_depth=8, decoder_num_heads=16, batch=8, kernel=7)
# Same structure at a size that compiles and runs in seconds.
SMOKE = dict(variant="Ti/8", image_size=32, decoder_width=32, decoder_depth=1, decoder_num_heads=4, batch=2, kernel=3)
MASK_RATIO = 0.75
THROW_RATIO = 0.5
ADAMW = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)


class OursStep:
    """Our compiled pretraining step for one method, on fixed synthetic images and token ids.

    The step is the trainer's: ``value_and_grad`` of the method's objective
    (``mae.reconstruction_loss``), then the pretraining AdamW update
    (``optim.build_optimizer``), the state donated. This class is the one place
    that builds it, so a change of the training API touches only here.
    """

    def __init__(self, shape: dict, reconstruction: str, throw_ratio: float, seed: int = 0):
        model_config = mae_lib.model_config(
            shape["variant"],
            image_size=shape["image_size"],
            decoder_width=shape["decoder_width"],
            decoder_depth=shape["decoder_depth"],
            decoder_num_heads=shape["decoder_num_heads"],
            aggregation_kernel=shape["kernel"] if reconstruction == "progressive" else 0,
            dtype="float32",
        )
        model = mae_lib.build_mae(model_config)
        layout = masking.TokenLayout(model.grid, MASK_RATIO, throw_ratio)
        batch = shape["batch"]
        rng = np.random.default_rng(seed)
        noise = np.stack([masking.draw_noise(rng, layout) for _ in range(batch)])
        ids = masking.sample("furthest" if throw_ratio else "random", noise, layout)
        images = rng.normal(size=(batch, *model.image_size, model.channels)).astype(np.float32)
        params = nn.unbox(model.init(jax.random.key(seed), images, *ids))["params"]
        tx = optim.build_optimizer(optim.optimizer_config(), global_batch=batch, total_steps=1000)
        self.state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
        self.data = jax.device_put({"images": images, "ids": tuple(ids)})

        def objective(params, data):
            visible, decoded, thrown = data["ids"]
            output = model.apply({"params": params}, data["images"], visible, decoded, thrown)
            return mae_lib.reconstruction_loss(data["images"], output, decoded, thrown, model.patch_size)

        def step(state, data):
            loss, grads = jax.value_and_grad(objective)(state.params, data)
            return state.apply_gradients(grads=grads), loss

        self.compiled = jax.jit(step, donate_argnums=0).lower(self.state, self.data).compile()
        memory = self.compiled.memory_analysis()
        self.facts = {
            "xla_flops_per_step": float(self.compiled.cost_analysis()["flops"]),
            "xla_temp_bytes": int(memory.temp_size_in_bytes),
        }

    def __call__(self):
        self.state, loss = self.compiled(self.state, self.data)
        return loss

    def sync(self, metrics):
        jax.block_until_ready(metrics)


class TransformersStep:
    """``ViTMAEForPreTraining`` + ``torch.optim.AdamW``: one forward, backward and update per call."""

    def __init__(self, shape: dict, seed: int = 0):
        width, depth, heads, patch = {"B/16": (768, 12, 12, 16), "Ti/8": (192, 2, 3, 8)}[shape["variant"]]
        torch.manual_seed(seed)
        config = transformers.ViTMAEConfig(
            image_size=shape["image_size"],
            patch_size=patch,
            num_channels=3,
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=4 * width,
            decoder_hidden_size=shape["decoder_width"],
            decoder_num_hidden_layers=shape["decoder_depth"],
            decoder_num_attention_heads=shape["decoder_num_heads"],
            decoder_intermediate_size=4 * shape["decoder_width"],
            hidden_act="gelu",  # exact (erf) GELU, as ours
            layer_norm_eps=1e-6,
            mask_ratio=MASK_RATIO,
            norm_pix_loss=True,
        )
        self.model = transformers.ViTMAEForPreTraining(config).train()
        self.attention = self.model.config._attn_implementation
        self.optimizer = torch.optim.AdamW(self.model.parameters(), **ADAMW)
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn((shape["batch"], 3, shape["image_size"], shape["image_size"]), generator=generator)

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(pixel_values=self.images).loss
        loss.backward()
        self.optimizer.step()
        return loss

    def sync(self, metrics):
        del metrics  # PyTorch on the CPU is synchronous


def conditions() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def use_threads(threads: int) -> None:
    """Give both frameworks ``threads`` compute threads; call before JAX starts its CPU backend."""
    torch.set_num_threads(threads)
    flags = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def run(args) -> dict:
    shape = SMOKE if args.smoke else FULL
    contestants = {"transformers_mae": TransformersStep(shape)}
    contestants["ours_mae"] = OursStep(shape, "full", 0.0)
    contestants["ours_partial"] = OursStep(shape, "partial", THROW_RATIO)
    contestants["ours_prmim"] = OursStep(shape, "progressive", THROW_RATIO)
    for step in contestants.values():  # warm-up: first calls allocate and fill caches
        for _ in range(2):
            step.sync(step())
    times = {clock: {name: [] for name in contestants} for clock in CLOCKS}
    for _ in range(args.rounds):
        for name, step in contestants.items():
            start = {clock: read() for clock, read in CLOCKS.items()}
            for _ in range(args.steps):
                metrics = step()
            step.sync(metrics)
            for clock, read in CLOCKS.items():
                times[clock][name].append((read() - start[clock]) / args.steps)
    medians = {clock: {name: float(np.median(t)) for name, t in per.items()} for clock, per in times.items()}
    return {
        "shape": shape,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "transformers_attention": contestants["transformers_mae"].attention,
        "seconds_per_step": times,
        "median_seconds_per_step": medians,
        "ratios": {clock: paired_ratios(per) for clock, per in times.items()},
        "xla": {name: step.facts for name, step in contestants.items() if isinstance(step, OursStep)},
        "conditions": conditions(),
    }


# wall: what a user waits; cpu: the process's CPU time, which other work on a shared machine moves
# much less (with one thread per framework no thread spins while waiting, so it is work done).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


RATIOS = (
    ("ours_mae", "transformers_mae"),
    ("ours_partial", "ours_mae"),
    ("ours_prmim", "ours_mae"),
    ("ours_prmim", "ours_partial"),
)


def paired_ratios(times: dict) -> dict:
    """Median over rounds of each round's ratio: the two steps of a pair ran seconds apart, so a
    slow spell of the shared machine scales both."""
    return {f"{a} / {b}": float(np.median(np.array(times[a]) / np.array(times[b]))) for a, b in RATIOS}


def markdown(result: dict, command: str) -> str:
    shape, medians, times = result["shape"], result["median_seconds_per_step"], result["seconds_per_step"]
    lines = [
        f"CPU train step, float32: ViT-{shape['variant']} at {shape['image_size']}px, decoder "
        f"{shape['decoder_width']} x {shape['decoder_depth']}, batch {shape['batch']}, forward + backward + AdamW, "
        f"{result['threads']} thread(s) per framework; {result['rounds']} interleaved rounds of "
        f"{result['steps_per_round']} step(s), medians.",
        "",
        "| contestant | wall s/step | CPU s/step | wall per round | XLA GFLOPs/step | XLA temp MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name in times["wall"]:
        facts = result["xla"].get(name)
        flops = f"{facts['xla_flops_per_step'] / 1e9:,.1f}" if facts else "-"
        temp = f"{facts['xla_temp_bytes'] / 2**20:,.0f}" if facts else "-"
        rounds = ", ".join(f"{s:.2f}" for s in times["wall"][name])
        lines.append(
            f"| {name} | {medians['wall'][name]:.3f} | {medians['cpu'][name]:.3f} | {rounds} | {flops} | {temp} |"
        )
    lines += ["", "| ratio (median of per-round ratios) | wall | CPU |", "|---|---|---|"]
    for name, wall in result["ratios"]["wall"].items():
        lines.append(f"| {name} | {wall:.3f} | {result['ratios']['cpu'][name]:.3f} |")
    flops = {name: facts["xla_flops_per_step"] for name, facts in result["xla"].items()}
    lines.append(f"| XLA FLOPs ours_prmim / ours_partial | {flops['ours_prmim'] / flops['ours_partial']:.4f} | |")
    c = result["conditions"]
    lines += [
        "",
        f"transformers' attention: `{result['transformers_attention']}`. Machine: {c['cpu_count']} CPUs "
        f"({c['processor']}), shared with other work (load average at the end "
        f"{c['load_average_1_5_15']}); jax {c['jax']}, torch {c['torch']} ({c['torch_threads']} threads), "
        f"transformers {c['transformers']}; XLA_FLAGS `{c['xla_flags']}`.",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--threads", type=int, default=2, help="compute threads per framework")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="steps per contestant per round")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    use_threads(args.threads)
    result = run(args)
    cpus = sorted(os.sched_getaffinity(0))
    pinned = f"taskset -c {','.join(map(str, cpus))} " if len(cpus) < os.cpu_count() else ""
    command = pinned + "python benchmarks/cpu_side_by_side.py" + (" --smoke" if args.smoke else "")
    command += f" --threads {args.threads} --rounds {args.rounds} --steps {args.steps}"
    command += f" --out {args.out}" if args.out else ""
    table = markdown(result, command)
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(f"{out}.json").write_text(json.dumps(result | {"command": command}, indent=1) + "\n")
        pathlib.Path(f"{out}.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
