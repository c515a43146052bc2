"""Our MAE train step against transformers' ``ViTMAEForPreTraining`` (PyTorch) on this machine's CPU, float32.

    taskset -c 0 python benchmarks/cpu_side_by_side.py --threads 1 --rounds 9 --out benchmarks/results/cpu_side_by_side
    python benchmarks/cpu_side_by_side.py --threads 2 --rounds 7 --out benchmarks/results/cpu_side_by_side.2threads
    taskset -c 0 python benchmarks/cpu_side_by_side.py --components --threads 1 --rounds 7 --out benchmarks/results/cpu_components
    python benchmarks/cpu_side_by_side.py --smoke [--components]   # tiny shapes, seconds: checks the script runs

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

``--components`` times the step's parts instead, to say where the two
frameworks differ: a transformer block, its attention (projections included),
the attention core alone (``softmax(q k^T) v`` on ``[B, heads, T, kv]``) and
the MLP, each forward + backward at the decoder's shape (197 tokens, width
512, 16 heads) and at the encoder's (50 visible tokens, ViT-B's 768, 12
heads), and the AdamW update over the step's parameter count. Ours runs twice:
as the model computes on the CPU (``layers.flattens_tokens``: every linear layer
multiplies ``[B T, D]``) and with that turned off (``[B, T, D]`` contracted
as such, what the model did before), so the table also measures that choice.
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
import optax
import torch
import transformers
from flax.training import train_state

from prmim_jax import masking, optim
from prmim_jax.models import attention as attention_lib
from prmim_jax.models import layers, vit
from prmim_jax.models import mae as mae_lib

# depth None: the variant's encoder depth.
FULL = dict(
    variant="B/16",
    image_size=224,
    depth=None,
    decoder_width=512,
    decoder_depth=8,
    decoder_num_heads=16,
    batch=8,
    kernel=7,
)
# Same structure at a size that compiles and runs in seconds.
SMOKE = dict(
    variant="Ti/8", image_size=32, depth=None, decoder_width=32, decoder_depth=1, decoder_num_heads=4, batch=2, kernel=3
)
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
            depth=shape["depth"],
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
            num_hidden_layers=shape["depth"] or depth,
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


# The parts that --components times: (name, tokens, width, heads) of the step's two transformers.
PARTS = {
    "full": (("decoder", 197, 512, 16), ("encoder", 50, 768, 12)),
    "smoke": (("decoder", 17, 32, 4), ("encoder", 5, 192, 3)),
}
PART_KINDS = ("block", "attention", "attention core", "mlp")
ADAMW_PARAMETERS = {"full": 111_900_000, "smoke": 100_000}  # MAE ViT-B/16 with its 512 x 8 decoder: 111.9 M


def ours_part(kind: str, batch: int, tokens: int, width: int, heads: int, flatten: bool):
    """Our ``kind`` (``PART_KINDS``) forward + backward, compiled with ``layers.flattens_tokens`` set to ``flatten``:
    a zero-argument callable that runs it once and waits."""
    rng = np.random.default_rng(0)
    if kind == "attention core":
        shape = (batch, tokens, heads, width // heads)
        inputs = [jax.device_put(rng.normal(size=shape).astype(np.float32)) for _ in range(3)]
        loss = lambda q, k, v: (attention_lib.cpu_attention(q, k, v) ** 2).sum()  # noqa: E731
        arguments = tuple(range(3))
    else:
        module = {
            "block": lambda: vit.Block(heads, 4 * width),
            "attention": lambda: attention_lib.Attention(heads),
            "mlp": lambda: layers.MlpBlock(4 * width),
        }[kind]()
        x = jax.device_put(rng.normal(size=(batch, tokens, width)).astype(np.float32))
        params = nn.unbox(module.init(jax.random.key(0), x))["params"]
        inputs = [params, x]
        loss = lambda params, x: (module.apply({"params": params}, x) ** 2).sum()  # noqa: E731
        arguments = (0, 1)
    original = layers.flattens_tokens
    layers.flattens_tokens = lambda: flatten  # read while tracing, so the compiled program keeps it
    try:
        compiled = jax.jit(jax.grad(loss, argnums=arguments)).lower(*inputs).compile()
    finally:
        layers.flattens_tokens = original
    return lambda: jax.block_until_ready(compiled(*inputs))


def transformers_part(kind: str, batch: int, tokens: int, width: int, heads: int):
    """transformers' ``ViTMAELayer`` (SDPA attention) part ``kind``, forward + backward: a zero-argument callable."""
    config = transformers.ViTMAEConfig(
        hidden_size=width,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    config._attn_implementation = "sdpa"
    layer = transformers.models.vit_mae.modeling_vit_mae.ViTMAELayer(config)
    first = lambda output: output[0] if isinstance(output, tuple) else output  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    if kind == "attention core":
        shape = (batch, heads, tokens, width // heads)
        inputs = [torch.randn(shape, generator=generator).requires_grad_(True) for _ in range(3)]
        forward = torch.nn.functional.scaled_dot_product_attention
    else:
        inputs = [torch.randn((batch, tokens, width), generator=generator).requires_grad_(True)]
        forward = {
            "block": lambda x: first(layer(x)),
            "attention": lambda x: first(layer.attention(x)),
            "mlp": layer.mlp,
        }[kind]

    def run_once():
        (forward(*inputs) ** 2).sum().backward()

    return run_once


def ours_adamw(parameters: int):
    """The pretraining AdamW update (``optim``) of ``parameters`` float32 values in 8 arrays: a zero-argument callable."""
    tx = optim.build_optimizer(optim.optimizer_config(), global_batch=8, total_steps=1000)
    rng = np.random.default_rng(0)
    params = [jax.device_put(rng.normal(size=(parameters // 8 // 3072, 3072)).astype(np.float32)) for _ in range(8)]
    grads = [0.1 * p for p in params]

    def update(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    update = jax.jit(update, donate_argnums=(0, 1))
    held = {"params": params, "state": tx.init(params)}

    def run_once():
        held["params"], held["state"] = jax.block_until_ready(update(held["params"], held["state"]))

    return run_once


def transformers_adamw(parameters: int):
    """``torch.optim.AdamW`` over the same arrays as ``ours_adamw``: a zero-argument callable."""
    params = [torch.nn.Parameter(torch.randn(parameters // 8 // 3072, 3072)) for _ in range(8)]
    for p in params:
        p.grad = 0.1 * p.detach()
    optimizer = torch.optim.AdamW(params, **ADAMW)
    return optimizer.step


def run_components(args) -> dict:
    """Median seconds of each part, ours (flattened and not) and transformers', timed in interleaved rounds."""
    size = "smoke" if args.smoke else "full"
    batch = (SMOKE if args.smoke else FULL)["batch"]
    contestants = {}
    for where, tokens, width, heads in PARTS[size]:
        for kind in PART_KINDS:
            shape = (batch, tokens, width, heads)
            versions = {"ours": ours_part(kind, *shape, flatten=True)}
            if kind != "attention core":  # no linear layer in it
                versions["ours, not flattened"] = ours_part(kind, *shape, flatten=False)
            contestants[f"{where} {kind}"] = versions | {"transformers": transformers_part(kind, *shape)}
    contestants["AdamW update"] = {
        "ours": ours_adamw(ADAMW_PARAMETERS[size]),
        "transformers": transformers_adamw(ADAMW_PARAMETERS[size]),
    }
    for versions in contestants.values():  # warm-up
        for run_once in versions.values():
            run_once()
    times = {part: {name: [] for name in versions} for part, versions in contestants.items()}
    for _ in range(args.rounds):
        for part, versions in contestants.items():
            for name, run_once in versions.items():
                start = time.process_time()
                run_once()
                times[part][name].append(time.process_time() - start)
    return {
        "shapes": {where: dict(batch=batch, tokens=t, width=w, heads=h) for where, t, w, h in PARTS[size]},
        "adamw_parameters": ADAMW_PARAMETERS[size],
        "threads": args.threads,
        "rounds": args.rounds,
        "cpu_seconds": times,
        "median_cpu_seconds": {part: {n: float(np.median(t)) for n, t in per.items()} for part, per in times.items()},
        "conditions": conditions(),
    }


def components_markdown(result: dict, command: str) -> str:
    shapes = result["shapes"]
    lines = [
        "The CPU train step's parts, float32, forward + backward, batch "
        f"{shapes['decoder']['batch']}: decoder {shapes['decoder']['tokens']} tokens of width "
        f"{shapes['decoder']['width']} ({shapes['decoder']['heads']} heads), encoder {shapes['encoder']['tokens']} "
        f"tokens of {shapes['encoder']['width']} ({shapes['encoder']['heads']} heads); AdamW over "
        f"{result['adamw_parameters'] / 1e6:g} M parameters. {result['threads']} thread(s) per framework, CPU time, "
        f"median of {result['rounds']} interleaved rounds, milliseconds.",
        "",
        "| part | ours | ours, not flattened | transformers | ours / transformers | flattened / not |",
        "|---|---|---|---|---|---|",
    ]
    for part, medians in result["median_cpu_seconds"].items():
        ours, layered, theirs = (medians.get(n) for n in ("ours", "ours, not flattened", "transformers"))
        lines.append(
            f"| {part} | {1e3 * ours:.1f} | {'-' if layered is None else f'{1e3 * layered:.1f}'} | {1e3 * theirs:.1f} | "
            f"{ours / theirs:.2f} | {'-' if layered is None else f'{ours / layered:.2f}'} |"
        )
    c = result["conditions"]
    lines += [
        "",
        f"transformers' `ViTMAELayer` with SDPA attention (its attention core: "
        "`torch.nn.functional.scaled_dot_product_attention`); ours: `vit.Block`, `attention_lib.Attention`, "
        "`attention_lib.cpu_attention`, `layers.MlpBlock` and the pretraining AdamW of `optim` (betas 0.9 / 0.95 as "
        f"`torch.optim.AdamW` here). Machine: {c['cpu_count']} CPUs ({c['processor']}), load average at the end "
        f"{c['load_average_1_5_15']}; jax {c['jax']}, torch {c['torch']}, transformers {c['transformers']}.",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines) + "\n"


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
    shape = dict(SMOKE if args.smoke else FULL)
    shape.update({key: getattr(args, key) for key in ("depth", "decoder_depth") if getattr(args, key) is not None})
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
        f"CPU train step, float32: ViT-{shape['variant']}"
        + (f" with {shape['depth']} block(s)" if shape["depth"] else "")
        + f" at {shape['image_size']}px, decoder "
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
    parser.add_argument("--components", action="store_true", help="time the step's parts instead of the step")
    parser.add_argument("--depth", type=int, default=None, help="encoder blocks (default: the variant's)")
    parser.add_argument("--decoder_depth", type=int, default=None, help="decoder blocks (default: the shape's)")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    for key in ("depth", "decoder_depth"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key} {getattr(args, key)}: a transformer needs at least 1 block.")
    use_threads(args.threads)
    result = run_components(args) if args.components else run(args)
    cpus = sorted(os.sched_getaffinity(0))
    pinned = f"taskset -c {','.join(map(str, cpus))} " if len(cpus) < os.cpu_count() else ""
    command = pinned + "python benchmarks/cpu_side_by_side.py" + (" --smoke" if args.smoke else "")
    command += " --components" if args.components else ""
    command += "".join(f" --{k} {getattr(args, k)}" for k in ("depth", "decoder_depth") if getattr(args, k) is not None)
    command += f" --threads {args.threads} --rounds {args.rounds} --steps {args.steps}"
    command += f" --out {args.out}" if args.out else ""
    table = components_markdown(result, command) if args.components else markdown(result, command)
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(f"{out}.json").write_text(json.dumps(result | {"command": command}, indent=1) + "\n")
        pathlib.Path(f"{out}.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
