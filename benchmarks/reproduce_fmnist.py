"""Tables 2 and 6 on Fashion-MNIST at a scale meant to tell the methods apart, in one process.

    python benchmarks/reproduce_fmnist.py --plan gpu --out OUT     # the full grid (one H100: under 8 minutes)
    bash benchmarks/reproduce_fmnist.sh --plan gpu OUT             # the same on a bare GPU machine
    python benchmarks/reproduce_fmnist.py --plan cpu --out OUT     # what fits on a 2-core machine
    python benchmarks/reproduce_fmnist.py --plan smoke --out OUT   # tiny shapes, every code path (CI)

Rows, in the order they run (an exhausted ``--budget`` drops the last ones):
MAE; PR-MIM and partial reconstruction at rho_d 0.5, 0.65 and 0.25 with
furthest sampling (Table 2); MAE + AMT (partial reconstruction, AMT's
attention-driven masking and throwing, at its Table-6 rho_d 0.4) and MAE +
running-cell (VideoMAE V2's pattern at 0.5) (Table 6); and a classifier trained
from scratch with the fine-tuning recipe and budget (the baseline pretraining
must beat).

**Why in one process, seeds side by side.** The encoder of the main job
(``configs/pretrain_fmnist.py``: width 128, depth 4, 14 x 14 tokens) is far too
small to fill a GPU, and a run through ``main.py`` pays start-up, compilation and
evaluation once per run. Here each row compiles once (its step compiling in a
background thread while the row before it trains: a GPU host's compilation of
a step takes tens of seconds, ten rows of it a large share of the budget) and trains all its seeds
at once: the train state has a leading seed axis and the step is the project's
``train_step`` under ``jax.vmap``. A seed is one run: it fixes the
initialisation (the same for the parameters every method shares), the order of
the images, their crops and flips, and the token noise, so the visible tokens of
a seed are the same in every row and the differences to MAE are paired.

**What each row measures**, per seed: pretraining (the method's loss, AdamW and
schedule of ``configs/pretrain_fmnist.py``, batch ``--batch``); kNN top-1 (k=20)
on the test set against all training images; a linear probe (MAE's head: the
frozen encoder's cls token, standardised as its BatchNorm does, a linear layer,
here trained to convergence by full-batch Adam: MAE's LARS schedule is made for
90 epochs, and 100 of its steps left even random features at 14%); full
fine-tuning (``configs/finetune_fmnist.py``'s default recipe, the one measured to
train at this budget: whole images, no mixing, layer decay 0.9, base lr 3e-3, a
BatchNorm before the head; the plan sets batch and epochs); and, for rows that
throw, the gradient distance to MAE (Fig. 4: ``||g - g_MAE|| / ||g_MAE||`` on a
fixed batch, both at the row's parameters with the same visible tokens) at
``--graddiff_points`` points along pretraining.

**Where it differs from the pipeline of ``main.py``**: the images live on the
device and are cropped and flipped there (antialiased bilinear resampling of
the host's crop boxes, drawn as ``RandomResizedCrop`` draws them); the host
draws the boxes and the token sets (in worker processes). RandAugment, random
erasing and the host's bicubic resampler are not applied.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import pathlib
import platform
import sys
import time

import numpy as np

BENCHMARKS = pathlib.Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCHMARKS))


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    method: str  # 'mae', 'partial', 'prmim', or 'scratch' (no pretraining)
    sampler: str
    rho_d: float
    table: str


ROWS = (
    Row("mae", "mae", "random", 0.0, "2"),
    Row("prmim_0.5", "prmim", "furthest", 0.5, "2"),
    Row("partial_0.5", "partial", "furthest", 0.5, "2"),
    Row("prmim_0.65", "prmim", "furthest", 0.65, "2"),
    Row("partial_0.65", "partial", "furthest", 0.65, "2"),
    Row("prmim_0.25", "prmim", "furthest", 0.25, "2"),
    Row("partial_0.25", "partial", "furthest", 0.25, "2"),
    Row("amt_0.4", "partial", "amt", 0.4, "6"),
    Row("running_cell_0.5", "partial", "running_cell", 0.5, "6"),
    Row("scratch", "scratch", "-", 0.0, "baseline"),
)

# Sizes. 'gpu': one H100 in under 8 minutes by XLA's FLOP counts (benchmarks/results/reproduce_fmnist.md:
# about 33 PFLOP in all, 330 s at 100 TFLOP/s), the budget guard dropping the last rows if the card is
# slower; 'cpu': the real model at a size a 2-core machine runs in minutes per row (a timing, not a
# result: the same file says why); 'smoke': every code path in seconds.
PLANS = {
    "smoke": dict(
        seeds=2, batch=8, pretrain_epochs=2, finetune_epochs=1, probe_steps=20, train_examples=64,
        test_examples=32, graddiff_points=2, graddiff_batch=8, amt_interval=1, amt_warmup=0, tiny=True, budget=600,
    ),
    "cpu": dict(
        seeds=2, batch=128, pretrain_epochs=2, finetune_epochs=1, probe_steps=500, train_examples=1280,
        test_examples=1000, graddiff_points=1, graddiff_batch=64, amt_interval=0, amt_warmup=-1, tiny=False,
        budget=3600,
    ),
    "gpu": dict(
        seeds=4, batch=256, pretrain_epochs=16, finetune_epochs=5, probe_steps=500, train_examples=60000,
        test_examples=10000, graddiff_points=5, graddiff_batch=256, amt_interval=0, amt_warmup=-1, tiny=False,
        budget=450,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The host: crop boxes and token sets (numpy; worker processes)


def crop_boxes(rng: np.random.Generator, count: int, scale, ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """``[count, 5] float32``: ``RandomResizedCrop`` boxes (top, left, height, width as fractions of the
    image) and a flip (1.0 with p = 0.5), ``RandomResizedCropFlip``'s ``'crop'``.

    torchvision's rule, vectorised: the first of 10 tries of area fraction
    uniform in ``scale`` and aspect log-uniform in ``ratio`` that fits, else the
    whole image (square images: the central crop in ratio is the image).
    """
    area = rng.uniform(scale[0], scale[1], (count, 10))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (count, 10)))
    width, height = np.sqrt(area * aspect), np.sqrt(area / aspect)
    fits = (width <= 1) & (height <= 1)
    first = np.argmax(fits, axis=1)
    found = fits[np.arange(count), first]
    width = np.where(found, width[np.arange(count), first], 1.0)
    height = np.where(found, height[np.arange(count), first], 1.0)
    top, left = rng.uniform(size=count) * (1 - height), rng.uniform(size=count) * (1 - width)
    flip = rng.uniform(size=count) < 0.5
    return np.stack([top, left, height, width, flip], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, examples: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch, 0)).permutation(examples)


def stacked_ids(ids: list) -> tuple:
    """Each seed's ``TokenIds`` stacked on a leading seed axis: ``(visible [S, B, n_vis], decoded [S, B, n_dec],
    thrown [S, B, n_thr])``, the order ``masking.TokenIds`` takes them in."""
    return tuple(np.stack([getattr(i, kind) for i in ids]) for kind in ("visible", "decoded", "thrown"))


def host_batches(task: tuple) -> dict:
    """One step's host arrays for every seed: ``index [S, B]``, ``crop [S, B, 5]``, ``noise [S, B, 2, N]``
    and, unless the sampler is ``amt`` (whose maps live in the main process), ``ids`` (``stacked_ids``)."""
    seeds, step, batch, examples, scale, sampler, layout = task
    steps_per_epoch = examples // batch
    epoch, within = divmod(step, steps_per_epoch)
    out = {"index": [], "crop": [], "noise": []}
    for seed in seeds:
        out["index"].append(epoch_order(seed, epoch, examples)[within * batch : (within + 1) * batch])
        rng = np.random.default_rng((seed, step, 1))
        out["crop"].append(crop_boxes(rng, batch, scale))
        out["noise"].append(rng.random((batch, 2, layout.num_tokens), dtype=np.float32))
    out = {key: np.stack(value) for key, value in out.items()}
    if sampler != "amt":
        noise = out.pop("noise")
    if sampler is not None and sampler != "amt":
        from prmim_jax import masking

        out["ids"] = stacked_ids([masking.sample(sampler, one, layout) for one in noise])
    return out


def prefetched(pool, tasks, ahead: int = 32):
    """``host_batches`` of ``tasks`` in order, computed by ``pool`` at most ``ahead`` steps in advance."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(host_batches, (task,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------------------------
# The device


def augment(images, crops, size: int):
    """``images [B, H, W, C] uint8``, ``crops [B, 5]`` (``crop_boxes``) -> ``[B, size, size, C] uint8``: each
    box cut and resized (antialiased bilinear), mirrored where its flip is set."""
    import jax
    import jax.numpy as jnp

    height, width, channels = images.shape[1:]

    def one(image, crop):
        scale = jnp.stack([size / (crop[2] * height), size / (crop[3] * width)])
        translation = -jnp.stack([crop[0] * height, crop[1] * width]) * scale
        out = jax.image.scale_and_translate(
            image.astype(jnp.float32), (size, size, channels), (0, 1), scale, translation, "linear", antialias=True
        )
        out = jnp.where(crop[4] > 0.5, out[:, ::-1], out)
        return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)

    return jax.vmap(one)(images, crops)


def seed_keys(seeds, step):
    """``[S]`` keys: seed ``s``'s key for ``step`` (``fold_in(key(s), step)``, as the trainer folds)."""
    import jax

    return jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), step))(seeds)


def stacked_init_fn(method, tx, batch):
    """``seeds [S] -> `` the train states of every seed, stacked on a leading axis (seed ``s`` initialised from
    ``key(s)``), jitted."""
    import flax.linen as nn
    import jax

    from prmim_jax import runs

    return jax.jit(jax.vmap(lambda seed: nn.unbox(runs.init_state(method, tx, jax.random.key(seed), batch))))


def stacked_init(method, tx, seeds, batch):
    """The train states of every seed, stacked on a leading axis (``stacked_init_fn``)."""
    return stacked_init_fn(method, tx, batch)(seeds)


class Experiment:
    def __init__(self, args, plan: dict, pool):
        import jax
        import jax.numpy as jnp

        import configs.finetune_fmnist
        import configs.pretrain_fmnist
        from prmim_jax.data import sources

        self.args, self.plan, self.pool = args, plan, pool
        self.seeds = jnp.arange(plan["seeds"])
        self.pretrain_config = configs.pretrain_fmnist.get_config()
        # The config's default recipe, measured to train at this budget from the main job's encoder (its
        # docstring); the plan sets the batch and the epochs.
        self.finetune_config = configs.finetune_fmnist.get_config()
        if plan["tiny"]:
            tiny = dict(width=32, depth=1, num_heads=2)
            self.pretrain_config.model.update(tiny, decoder_width=16, decoder_depth=1, decoder_num_heads=2)
            self.finetune_config.model.update(tiny)
        train, test = (sources.FashionMnistSource(args.data_dir, split).arrays() for split in ("train", "test"))
        self.train_images = jax.device_put(train[0][: plan["train_examples"]])
        self.train_labels = jax.device_put(train[1][: plan["train_examples"]].astype(np.int32))
        self.test_images = jax.device_put(test[0][: plan["test_examples"]])
        self.test_labels = np.asarray(test[1][: plan["test_examples"]], np.int32)
        self.examples = int(self.train_images.shape[0])
        self.steps_per_epoch = self.examples // plan["batch"]
        self._features = self._classifier = None

    # --- pretraining ---

    def method(self, row: Row, total_steps: int = 1, **method_overrides):
        """``row``'s pretraining method: ``configs/pretrain_fmnist.py``'s model, optimizer (warm-up a tenth of
        ``total_steps``, as there) and data sections, ``row``'s method section."""
        from prmim_jax import methods
        from prmim_jax.methods import mae as mae_family

        section = methods.method_config(row.method, sampler=row.sampler, throw_ratio=row.rho_d, **method_overrides)
        config = self.pretrain_config
        optimizer = config.optimizer.copy_and_resolve_references()
        optimizer.warmup_steps = total_steps // 10
        return mae_family.from_sections(config.model, section, optimizer=optimizer, data=config.data)

    def pretrain_programs(self, row: Row, compiler) -> dict:
        """``row``'s pretraining method and step, the step traced and lowered here and compiled by ``compiler`` (a
        thread pool), so that ``main`` can have a row's step compile while the row before it trains:
        ``{'method', 'total', 'interval', 'warmup', 'init', 'step'}``: ``'init'`` is ``stacked_init_fn``'s, ``'step'``
        a future of the compiled step
        ``(state, dataset, index [S, B], crop [S, B, 5], ids, step) -> (state, metrics)``, the state donated; AMT
        adds ``'warmup_step'``, the same step at the token counts of its random masking before the first map."""
        import jax

        from prmim_jax import masking, train_step

        plan, batch = self.plan, self.plan["batch"]
        total = plan["pretrain_epochs"] * self.steps_per_epoch
        amt = row.sampler == "amt"
        interval = plan["amt_interval"] or max(1, plan["pretrain_epochs"] // 10)  # AMT's 40 of 400 epochs
        warmup = interval if plan["amt_warmup"] < 0 else plan["amt_warmup"]  # AMT's warm-up: its interval
        method = self.method(row, total, **(dict(amt_interval=interval, amt_warmup_epochs=warmup) if amt else {}))
        layout, size = method.layout, method.model.image_size[0]
        tx = method.optimizer(batch, total)

        def step_fn(state, dataset, index, crop, ids, step):
            def one(state, index, crop, visible, decoded, thrown, key):
                images = augment(dataset[index], crop, size)
                data = {"images": images, "ids_visible": visible, "ids_decoded": decoded, "ids_thrown": thrown}
                return train_step.train_step(state, data, key, method=method)

            return jax.vmap(one)(state, index, crop, *ids, seed_keys(self.seeds, step))

        # The host's arrays as host_batches makes them (their shapes and types are all the lowering reads).
        seeds = plan["seeds"]
        noise = np.random.default_rng(0).random((batch, 2, layout.num_tokens), dtype=np.float32)
        ids = stacked_ids([masking.sample(row.sampler, noise, layout)] * seeds)
        index = epoch_order(0, 0, self.examples)[: seeds * batch].reshape(seeds, batch)
        crop = np.zeros((seeds, batch, 5), np.float32)
        init = stacked_init_fn(method, tx, batch)
        state = jax.eval_shape(init, self.seeds)
        lowered = jax.jit(step_fn, donate_argnums=0).lower(state, self.train_images, index, crop, ids, 0)
        programs = dict(
            method=method,
            total=total,
            interval=interval,
            warmup=warmup,
            init=init,
            step=compiler.submit(lowered.compile),
        )
        warmup_layout = method.throwing.warmup_layout
        if amt and warmup_layout is not None:  # AMT before its first map: random masking, other token counts
            warm_ids = stacked_ids([masking.sample("random", noise, warmup_layout)] * seeds)
            warm = jax.jit(step_fn, donate_argnums=0).lower(state, self.train_images, index, crop, warm_ids, 0)
            programs["warmup_step"] = compiler.submit(warm.compile)
        return programs

    def pretrain(self, row: Row, log, programs: dict) -> dict:
        """Pretrains ``row`` for every seed with ``programs`` (``pretrain_programs``), measuring along the way."""
        import jax
        import jax.numpy as jnp

        from prmim_jax import attention_maps, masking
        from prmim_jax.models import attention as attention_lib

        plan, batch = self.plan, self.plan["batch"]
        amt = row.sampler == "amt"
        method, total = programs["method"], programs["total"]
        interval, warmup = programs["interval"], programs["warmup"]
        layout = method.layout
        state = programs["init"](self.seeds)
        step_fn = programs["step"].result()
        warmup_step_fn = programs["warmup_step"].result() if "warmup_step" in programs else None
        mae_method = self.method(ROWS[0])
        graddiff = self.graddiff_fn(method, mae_method) if row.method != "mae" else None
        graddiff_at = sorted({round(total * (i + 1) / plan["graddiff_points"]) for i in range(plan["graddiff_points"])})
        encoder, _ = method.encoder()
        maps = np.ones((plan["seeds"], self.examples, *layout.grid), np.float16) if amt else None
        refresh = set(attention_maps.refresh_steps(self.examples, batch, total, warmup, interval)) if amt else set()
        map_pass = jax.jit(
            jax.vmap(
                lambda params, images: attention_maps.pass_maps(
                    attention_lib.last_block_cls_attention(encoder, {"params": params}, method.normalize(images))[1],
                    layout.grid,
                ),
                in_axes=(0, None),
            )
        )
        tasks = (
            (tuple(range(plan["seeds"])), step, batch, self.examples, tuple(self.pretrain_config.data.crop_scale),
             row.sampler, layout)
            for step in range(total)
        )  # fmt: skip
        losses, curve, refreshes = [], [], []
        started = time.perf_counter()
        paused = 0.0  # seconds of map passes and gradient distances, which the step time leaves out
        refreshed = False
        for step, host in enumerate(prefetched(self.pool, tasks)):
            run_step = step_fn
            if amt:
                weights = None
                if refreshed:
                    weights = np.stack(
                        [
                            attention_maps.crop_maps(maps[s][host["index"][s]], host["crop"][s], layout.grid)
                            for s in range(plan["seeds"])
                        ]
                    ).reshape(plan["seeds"], batch, -1)
                if weights is None and warmup_step_fn is not None:  # before the first map: random, nothing thrown
                    run_step, warmup_layout = warmup_step_fn, method.throwing.warmup_layout
                    host["ids"] = stacked_ids(
                        [masking.sample("random", host["noise"][s], warmup_layout) for s in range(plan["seeds"])]
                    )
                else:
                    host["ids"] = stacked_ids(
                        [
                            masking.sample("amt", host["noise"][s], layout, None if weights is None else weights[s])
                            for s in range(plan["seeds"])
                        ]
                    )
            state, metrics = run_step(state, self.train_images, host["index"], host["crop"], host["ids"], step)
            losses.append(metrics["loss"])
            if step == 1:
                jax.block_until_ready(state)
                started = time.perf_counter()  # the steps after the first two (compilation) are timed
            if step + 1 in refresh or (graddiff is not None and step + 1 in graddiff_at):
                jax.block_until_ready(state)
                pause = time.perf_counter()
            if step + 1 in refresh:
                for chunk in range(0, self.examples, 2048):
                    maps[:, chunk : chunk + 2048] = np.asarray(
                        map_pass(state.params["encoder"], self.train_images[chunk : chunk + 2048])
                    ).astype(np.float16)
                refreshed = True
                refreshes.append(step + 1)
                log(f"  {row.name}: AMT maps refreshed after step {step + 1}")
            if graddiff is not None and step + 1 in graddiff_at:
                curve.append(dict(step=step + 1, relative_l2=[float(v) for v in graddiff(state.params)]))
            if step + 1 in refresh or (graddiff is not None and step + 1 in graddiff_at):
                paused += time.perf_counter() - pause
        jax.block_until_ready(state)
        timed = max(total - 2, 1)
        seconds_per_step = (time.perf_counter() - started - paused) / timed
        final = np.asarray(jnp.stack(losses[-max(1, self.steps_per_epoch // 4) :]))  # the last quarter epoch
        return dict(
            state=state,
            method=method,
            steps=total,
            loss=[float(v) for v in final.mean(axis=0)],
            seconds_per_step=seconds_per_step,
            graddiff=curve,
            amt_refreshes=refreshes,
        )

    def graddiff_fn(self, method, mae_method):
        """``params [S, ...] -> [S]``: Fig. 4's ``||g - g_MAE|| / ||g_MAE||`` on a fixed batch, each seed with its
        own noise (the same visible tokens for both); for ``amt``, its uniform draw (no map at a fixed batch)."""
        import jax
        import jax.numpy as jnp
        import optax

        from prmim_jax import masking

        count = self.plan["graddiff_batch"]
        images = method.normalize(self.train_images[:count])
        sampler = "random_throw" if method.throwing.sampler == "amt" else method.throwing.sampler
        noise = [np.random.default_rng((int(s), 7)).random((count, 2, method.layout.num_tokens)) for s in self.seeds]
        row_ids = [masking.sample(sampler, n, method.layout) for n in noise]
        mae_ids = [mae_method.sample(n) for n in noise]
        row_ids, mae_ids = stacked_ids(row_ids), stacked_ids(mae_ids)
        progressive = method.throwing.progressive

        def one(params, images, row_ids, mae_ids):
            shared = {key: value for key, value in params.items() if key != "aggregation"}
            row_grad = jax.grad(lambda p: method.objective(p, images, masking.TokenIds(*row_ids)))(
                params if progressive else shared
            )
            mae_grad = jax.grad(lambda p: mae_method.objective(p, images, masking.TokenIds(*mae_ids)))(shared)
            difference = jax.tree.map(jnp.subtract, {key: row_grad[key] for key in shared}, mae_grad)
            return optax.tree.norm(difference) / optax.tree.norm(mae_grad)

        vectorised = jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0)))
        return lambda params: np.asarray(vectorised(params, images, row_ids, mae_ids))

    # --- evaluation ---

    def frozen_features(self, method, params) -> dict:
        """kNN top-1 (k=20) and linear-probe top-1 of every seed's frozen encoder, from one pass over the
        training and test images: ``{'knn': [S], 'probe': [S]}``."""
        import jax
        import jax.numpy as jnp

        from prmim_jax.evaluate import knn

        if self._features is None:  # every row's encoder has the same shapes: one program for all
            encoder, _ = method.encoder()

            def features(p, images):
                tokens = encoder.apply({"params": p}, method.normalize(images))
                pooled = jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)  # EncoderOutput.pooled, as kNN's
                pooled = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True).clip(1e-12)
                return pooled, tokens[:, 0].astype(jnp.float32)  # the probe's: the cls token after the final norm

            self._features = jax.jit(jax.vmap(features, in_axes=(0, None)))

        def of(images):
            chunks = [self._features(params, images[i : i + 1024]) for i in range(0, len(images), 1024)]
            return tuple(np.concatenate([np.asarray(c[k]) for c in chunks], axis=1) for k in (0, 1))

        (train_pooled, train_cls), (test_pooled, test_cls) = of(self.train_images), of(self.test_images)
        labels = np.asarray(self.train_labels)
        return {
            "knn": [
                knn.knn_accuracy(train_pooled[s], labels, test_pooled[s], self.test_labels, k=20)
                for s in range(len(train_pooled))
            ],
            "probe": self.linear_probe(train_cls, labels, test_cls),
        }

    def linear_probe(self, train: np.ndarray, labels: np.ndarray, test: np.ndarray) -> list[float]:
        """Test top-1 of a linear classifier on frozen features ``[S, M, D]``, one per seed: MAE's probe head
        (features standardised over the training set, as its BatchNorm without affine does, then a linear
        layer), trained to convergence: full-batch Adam, ``probe_steps`` steps."""
        import jax
        import jax.numpy as jnp
        import optax

        mean, std = train.mean(axis=1, keepdims=True), train.std(axis=1, keepdims=True) + 1e-6
        train, test = jnp.asarray((train - mean) / std), jnp.asarray((test - mean) / std)
        classes = int(labels.max()) + 1
        tx = optax.adamw(1e-2, weight_decay=1e-4)

        def fit(features):
            params = {"w": jnp.zeros((features.shape[-1], classes)), "b": jnp.zeros(classes)}

            def loss(params):
                logits = features @ params["w"] + params["b"]
                return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()

            def step(carry, _):
                params, opt = carry
                updates, opt = tx.update(jax.grad(loss)(params), opt, params)
                return (optax.apply_updates(params, updates), opt), None

            (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, self.plan["probe_steps"])
            return params

        params = jax.jit(jax.vmap(fit))(train)
        predictions = np.asarray(jnp.einsum("smd,sdc->smc", test, params["w"]) + params["b"][:, None]).argmax(-1)
        return [float(v) for v in (predictions == self.test_labels).mean(axis=1)]

    def classifier(self) -> dict:
        """The fine-tuning programs (``configs/finetune_fmnist.py``'s default recipe at the plan's batch), built once
        for every row."""
        if self._classifier is not None:
            return self._classifier
        import jax

        from prmim_jax import train_step
        from prmim_jax.methods import Variables, classify

        batch = self.plan["batch"]
        config = self.finetune_config.copy_and_resolve_references()
        config.batch_size = batch
        config.total_steps = self.plan["finetune_epochs"] * self.steps_per_epoch
        config.optimizer.warmup_steps = max(1, config.total_steps // 10)
        method = classify.Classification(config)
        tx = method.optimizer(batch, config.total_steps)
        size = config.model.image_size

        def step_fn(state, dataset, labels, index, crop, step):
            def one(state, index, crop, key):
                data = {"images": augment(dataset[index], crop, size), "labels": labels[index]}
                return train_step.train_step(state, data, key, method=method)

            return jax.vmap(one)(state, index, crop, seed_keys(self.seeds + 1000, step))

        def logits_fn(params, frozen, stats, images):
            return method.logits(Variables(params, frozen, stats), images)

        self._classifier = dict(
            config=config,
            method=method,
            init=lambda: stacked_init(method, tx, self.seeds, batch),
            step=jax.jit(step_fn, donate_argnums=0),
            logits=jax.jit(jax.vmap(logits_fn, in_axes=(0, 0, 0, None))),
        )
        return self._classifier

    def with_encoder(self, state, method, module, params):
        """``state`` (a classifier's, stacked over seeds) with its encoder replaced by the pretrained ``module``'s
        ``params [S, ...]`` (``adapt_pretrained``: the fixed sin-cos table becomes the classifier's)."""
        import jax
        import jax.numpy as jnp

        encoder = method.model.encoder
        adapted = [
            encoder.adapt_pretrained(jax.tree.map(lambda x, s=s: np.asarray(x[s]), params), module)
            for s in range(self.plan["seeds"])
        ]

        def pretrained_leaf(path, old):  # the classifier's tree: what it lacks is an error, extras are dropped
            leaves = []
            for seed_params in adapted:
                for key in path:
                    seed_params = seed_params[key.key]
                leaves.append(seed_params)
            return jnp.stack(leaves).astype(old.dtype).reshape(old.shape)

        encoder = jax.tree_util.tree_map_with_path(pretrained_leaf, state.params["encoder"])
        return state.replace(params=dict(state.params) | {"encoder": encoder})

    def finetune(self, pretrained=None) -> dict:
        """Fine-tunes a classifier for every seed, from the pretrained encoders ``(module, params [S, ...])``
        or from scratch; ``{'accuracy': [S] test top-1, 'loss': [S] final training
        loss}``."""
        import jax.numpy as jnp

        programs = self.classifier()
        config, method = programs["config"], programs["method"]
        state = programs["init"]()
        if pretrained is not None:
            state = self.with_encoder(state, method, *pretrained)
        seeds = tuple(int(s) + 1000 for s in self.seeds)
        scale = tuple(config.data.crop_scale)
        tasks = (
            (seeds, step, config.batch_size, self.examples, scale, None, NoTokens())
            for step in range(config.total_steps)
        )
        losses = []
        for step, host in enumerate(prefetched(self.pool, tasks)):
            state, metrics = programs["step"](
                state, self.train_images, self.train_labels, host["index"], host["crop"], step
            )
            losses.append(metrics["loss"])
        predictions = np.concatenate(
            [
                np.asarray(
                    programs["logits"](
                        state.params, state.frozen, state.batch_stats, self.test_images[i : i + 1024]
                    ).argmax(-1)
                )
                for i in range(0, len(self.test_labels), 1024)
            ],
            axis=1,
        )
        final = np.asarray(jnp.stack(losses[-max(1, self.steps_per_epoch // 4) :])).mean(axis=0)
        return dict(
            accuracy=[float(v) for v in (predictions == self.test_labels).mean(axis=1)], loss=[float(v) for v in final]
        )


class NoTokens:
    """The layout ``host_batches`` gets for classification: its noise of one value per image goes unused."""

    num_tokens = 1


# ---------------------------------------------------------------------------------------------------------------
# The table


def mean_spread(values) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


def summarise(results: dict) -> list[dict]:
    """Per row: each metric's mean +- std over seeds and its paired difference to MAE's run of the same seed."""
    mae = results.get("mae", {})
    rows = []
    for row in ROWS:
        result = results.get(row.name)
        if not result or "error" in result:
            continue
        summary = dict(dataclasses.asdict(row), status=result.get("status", "ok"))
        for metric in ("finetune", "probe", "knn"):
            values = result.get(metric)
            if values is None:
                continue
            summary[metric] = mean_spread(values)
            if row.name != "mae" and mae.get(metric):
                summary[f"{metric}_vs_mae"] = mean_spread([a - b for a, b in zip(values, mae[metric], strict=True)])
        summary["pretrain_loss"] = mean_spread(result.get("pretrain_loss", []))
        if result.get("seconds_per_step") and mae.get("seconds_per_step"):
            summary["step_time_vs_mae"] = result["seconds_per_step"] / mae["seconds_per_step"]
        summary["seconds"] = result.get("seconds")
        rows.append(summary)
    return rows


def report(run: dict) -> str:
    plan, rows = run["plan"], summarise(run["results"])

    def pct(stat, signed=False):
        if not stat or stat[0] is None:
            return "-"
        mean, spread, n = stat
        return f"{100 * mean:{'+' if signed else ''}.2f} +- {100 * spread:.2f} ({n})"

    lines = [
        "# Tables 2 and 6 on Fashion-MNIST (benchmarks/reproduce_fmnist.py)",
        "",
        f"`{run['meta']['command']}` on {run['meta']['device']}, {run['meta']['date']}; {run['meta']['seconds']:.0f} s.",
        "",
        f"Plan `{run['meta']['plan']}`: {plan['seeds']} seeds side by side, batch {plan['batch']} per seed, "
        f"{plan['train_examples']} training images ({run['meta']['steps_per_epoch']} steps an epoch); pretraining "
        f"{plan['pretrain_epochs']} epochs, fine-tuning {plan['finetune_epochs']}, linear probe {plan['probe_steps']} "
        "full-batch steps on the frozen cls token "
        f"(the scratch row: the fine-tuning recipe from random initialisation). Test top-1 in % on "
        f"{plan['test_examples']} test images, mean +- std over seeds (n); '- MAE' is the paired difference to MAE's "
        "run of the same seed (same initialisation, images, crops and visible tokens).",
        "",
        "| row | table | method | sampler | rho_d | fine-tune | - MAE | linear probe | - MAE | kNN | - MAE | pretrain loss | step time / MAE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mae = r["name"] == "mae"
        loss = r["pretrain_loss"]
        lines.append(
            f"| {r['name']} | {r['table']} | {r['method']} | {r['sampler']} | {r['rho_d']:g} | {pct(r.get('finetune'))} | "
            f"{'-' if mae else pct(r.get('finetune_vs_mae'), True)} | {pct(r.get('probe'))} | "
            f"{'-' if mae else pct(r.get('probe_vs_mae'), True)} | {pct(r.get('knn'))} | "
            f"{'-' if mae else pct(r.get('knn_vs_mae'), True)} | "
            f"{'-' if loss[0] is None else f'{loss[0]:.4f}'} | {r.get('step_time_vs_mae', float('nan')):.3f} |"
        )
    skipped = [name for name, result in run["results"].items() if result.get("status", "ok") != "ok"]
    for name in skipped:
        lines.append(f"\n`{name}`: {run['results'][name]['status']}")
    curves = [(name, point) for name, result in run["results"].items() for point in result.get("graddiff", [])]
    if curves:
        lines += [
            "",
            "Fig. 4, `||g - g_MAE|| / ||g_MAE||` (mean over seeds):",
            "",
            "| row | step | distance |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {p['step']} | {np.mean(p['relative_l2']):.4f} |" for name, p in curves]
    return "\n".join(lines) + "\n"


def draw(run: dict, out: pathlib.Path) -> None:
    import plots

    by_name = {row.name: row for row in ROWS}
    summary = [r for r in summarise(run["results"]) if r["method"] != "scratch"]
    for r in summary:
        r["sampler"] = f"{r['sampler']} (Table {r['table']})"
    plots.ablation(
        summary,
        out / "reproduce_fmnist_table.png",
        {"finetune": "fine-tune", "probe": "linear probe", "knn": "kNN (k=20)"},
        title=f"Fashion-MNIST, {run['plan']['pretrain_epochs']} pretraining epochs: mean +- std over seeds",
    )
    curve_rows = [
        dict(step=p["step"], method=by_name[name].method, sampler=by_name[name].sampler, rho_d=by_name[name].rho_d,
             relative_l2=float(np.mean(p["relative_l2"])))
        for name, result in run["results"].items()
        for p in result.get("graddiff", [])
    ]  # fmt: skip
    if curve_rows:
        plots.gradient_distance(curve_rows, out / "reproduce_fmnist_fig4.png")


# ---------------------------------------------------------------------------------------------------------------
# The driver


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--plan", choices=tuple(PLANS), default="gpu")
    parser.add_argument("--rows", default=",".join(row.name for row in ROWS), help="comma-separated subset of the rows")
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST's IDX files (default: Debian's, else .data/)")
    parser.add_argument("--workers", type=int, default=None, help="host processes drawing crops and token sets")
    for key, value in PLANS["gpu"].items():
        if key != "tiny":
            parser.add_argument(
                f"--{key}", type=type(value), default=None, help=f"overrides the plan's ({value} on gpu)"
            )
    args = parser.parse_args(argv)
    plan = dict(PLANS[args.plan])
    plan.update({key: getattr(args, key) for key in plan if getattr(args, key, None) is not None})
    names = args.rows.split(",")
    unknown = set(names) - {row.name for row in ROWS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {[row.name for row in ROWS]}")
    if "mae" not in names:
        parser.error("the rows must include 'mae': every difference is paired with MAE's run")
    from prmim_jax.data import sources

    args.data_dir = args.data_dir or next(
        (d for d in (sources.FASHION_MNIST_DIR, REPO / ".data" / "fashion-mnist") if pathlib.Path(d).is_dir()), None
    )
    if args.data_dir is None:
        parser.error(
            f"no Fashion-MNIST at {sources.FASHION_MNIST_DIR} or .data/fashion-mnist: install Debian's "
            "dataset-fashion-mnist, or copy its files to .data/fashion-mnist (and carry .data to a GPU machine)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    # Workers fork before JAX starts its threads: numpy alone runs in them.
    workers = args.workers or max(1, min(8, (os.cpu_count() or 2) - 1))
    pool = multiprocessing.get_context("fork").Pool(workers)

    import jax

    started = time.time()
    experiment = Experiment(args, plan, pool)
    run = {
        "meta": {
            "command": "python benchmarks/reproduce_fmnist.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "plan": args.plan,
            "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} host cores",
            "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "versions": {"jax": jax.__version__, "python": platform.python_version()},
            "steps_per_epoch": experiment.steps_per_epoch,
            "workers": workers,
        },
        "plan": plan,
        "results": {},
    }

    def log(line):
        print(line, flush=True)

    def write():
        run["meta"]["seconds"] = time.time() - started
        (args.out / "reproduce_fmnist.json").write_text(json.dumps(run, indent=1) + "\n")
        (args.out / "reproduce_fmnist.md").write_text(report(run))

    # One row ahead: a row's step is lowered before the row before it trains and compiles meanwhile.
    compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
    order = [row for row in ROWS if row.name in names]
    programs = {}

    def prepare(position):
        if position < len(order) and order[position].method != "scratch":
            programs[order[position].name] = experiment.pretrain_programs(order[position], compiler)

    prepare(0)
    longest = 0.0
    for position, row in enumerate(order):
        if time.time() - started + longest > plan["budget"] and row.name != "mae":
            run["results"][row.name] = {"status": f"skipped: out of the {plan['budget']} s budget"}
            programs.pop(row.name, None)
            write()
            continue
        row_started = time.time()
        prepare(position + 1)
        result = run["results"].setdefault(row.name, {})
        if row.method == "scratch":
            result |= {"finetune": experiment.finetune()["accuracy"]}
        else:
            pretrained = experiment.pretrain(row, log, programs.pop(row.name))
            state, method = pretrained.pop("state"), pretrained.pop("method")
            encoder, _ = method.encoder()
            encoder_params = state.params["encoder"]
            del state
            result |= {
                "pretrain_loss": pretrained["loss"],
                "seconds_per_step": pretrained["seconds_per_step"],
                "graddiff": pretrained["graddiff"],
                **({"amt_refreshes": pretrained["amt_refreshes"]} if row.sampler == "amt" else {}),
                **experiment.frozen_features(method, encoder_params),
            }
            result["finetune"] = experiment.finetune((encoder, encoder_params))["accuracy"]
        result["seconds"] = time.time() - row_started
        longest = max(longest, result["seconds"])
        log(f"{row.name}: " + ", ".join(f"{k} {np.round(v, 4).tolist()}" for k, v in result.items() if k != "graddiff"))
        write()
    pool.close()
    compiler.shutdown(wait=False, cancel_futures=True)
    write()
    draw(run, args.out)
    print(report(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
