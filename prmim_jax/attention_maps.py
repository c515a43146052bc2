"""AMT's attention maps: the per-image state of the ``amt`` sampler, in one place.

AMT (Liu, Gui and Luo, "Good helper is around you: attention-driven masked
image modeling", AAAI 2023; code ``guijiejie/AMT``) masks and throws tokens by
the attention the current encoder pays them. What its MAE code does, and this
module with it:

- **Maps.** Every training image has a map over the token grid, initially all
  ones (``amtdatasets.MyImageFolder.mask_weights``): a uniform draw, i.e.
  random masking. ``misc.update_mask`` runs the current encoder (eval mode)
  over every training image resized whole to the input size
  (``transforms.Resize((224, 224))``: no crop, no flip; here
  ``pipeline.eval_dataset(whole_image=True)``), takes its last block's
  attention of the cls query over the patch keys (``attn[:, :, 0, 1:]``;
  ``attention.last_block_cls_attention``), min-max normalises each head over the
  patches and averages the heads: ``[grid_h, grid_w]`` per image (``pass_maps``).
- **When.** ``main_pretrain.py`` refreshes the maps after epoch ``e`` (counted
  from 0) when ``e >= warmup_epochs``, ``e % loc_interval == 0`` and ``e`` is
  not the last epoch; AMT's values are 40 and 40, so epochs 0-40 mask at random
  and the maps are renewed after epochs 40, 80, ... Here ``method.amt_warmup_epochs``
  and ``method.amt_interval`` (same defaults), and an epoch ends after the step
  that consumes the last of its images (``refresh_steps``); the maps are
  refreshed after that step and before its checkpoint, so a checkpoint holds
  the maps the next step reads.
- **Per step.** An image's map is cut with the box its random resized crop
  used and mirrored with it (``amtdatasets.maskRandomResizedCrop`` /
  ``maskRandomHorizontalFlip``; here ``crop_maps`` at the token grid), and its
  values are the weights of the multinomial draw (``masking.multinomial_order``:
  first drawn decoded, next thrown, last visible; no temperature, no uniform
  mixing).

Where this differs from AMT's code, and why:

- AMT cuts the map with ``mask[i // H : (i + h) // H + 2, j // W : (j + w) // W + 2]``
  (pixel offsets divided by the image size), which keeps the map's top-left
  2x2 or 3x3 cells whatever the box; here the box the image was cut with, in
  map coordinates, which is what the paper describes (the map follows the crop).
- During warm-up AMT masks 75% at random with nothing thrown (``mae-AMT/models_mae.py``
  L207-210; SimMIM-AMT 44%), as here (``method.amt_warmup_mask_ratio``): the batches
  then have other token counts, and the step compiles once more at the first map.
- A head whose attention is constant has no min-max range (AMT divides by
  zero); here it contributes zeros. All-zero maps draw uniformly.

**State, sharding and checkpoints** (``AttentionMaps``). Maps are float16 on
the host, ``grid_h * grid_w * 2`` bytes per image (392 at 14x14: 502 MB for
ImageNet-1K's 1,281,167 training images). The map pass reads the training split
like an evaluation pass with global batch ``G = batch_size``: image ``i`` is
computed, and kept, by process ``(i % G) // b`` (``b = G / processes``) at row
``(i // G) * b + i % b`` of its array (``owner_and_row``), so each process holds
``1 / processes`` of the maps. A process's training batch holds images
that other processes keep (the stream is shuffled globally): each step the
processes exchange the maps of the step's global batch (``share``, one
all-gather of ``G`` indices and one of ``processes x G`` maps; a single
process reads its own array). Each process checkpoints its share
(``state_dict``: ``host/process_<i>-of-<n>.npz``), so a run resumes with the
same number of processes, as its data iterator does.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from prmim_jax import masking, sharding
from prmim_jax.data import pipeline
from prmim_jax.models import attention as attention_lib

MAP_DTYPE = np.float16


def refresh_steps(
    num_examples: int, global_batch: int, total_steps: int, warmup_epochs: int, interval: int
) -> tuple[int, ...]:
    """The steps after which AMT renews the maps: ``ceil((e + 1) * num_examples / global_batch)`` for every
    epoch ``e >= warmup_epochs`` with ``e % interval == 0``, before ``total_steps``."""
    steps = []
    epoch = warmup_epochs + (-warmup_epochs) % interval  # the first multiple of interval at or after warm-up
    while (step := math.ceil((epoch + 1) * num_examples / global_batch)) < total_steps:
        steps.append(step)
        epoch += interval
    return tuple(steps)


def owner_and_row(indices: np.ndarray, pass_batch: int, process_count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(process, row)`` keeping the map of each source index in ``indices`` (the module docstring)."""
    local = pass_batch // process_count
    indices = np.asarray(indices, np.int64)
    return (indices % pass_batch) // local, (indices // pass_batch) * local + indices % local


def local_indices(num_examples: int, pass_batch: int, process_count: int, process_index: int) -> np.ndarray:
    """The source index of every row of ``process_index``'s share, -1 on padding rows: ``[rows] int64``."""
    local = pass_batch // process_count
    batches = math.ceil(num_examples / pass_batch)
    starts = np.arange(batches)[:, None] * pass_batch + process_index * local
    indices = (starts + np.arange(local)).reshape(-1)
    return np.where(indices < num_examples, indices, -1)


def share(local_maps: np.ndarray, indices: np.ndarray, pass_batch: int, process_count: int, process_index: int):
    """``[len(indices), h, w]``: this process's maps of ``indices`` (the global batch's source indices),
    zeros where another process keeps the map; the sum over processes is every map."""
    owner, row = owner_and_row(indices, pass_batch, process_count)
    out = np.zeros((len(indices), *local_maps.shape[1:]), local_maps.dtype)
    mine = owner == process_index
    out[mine] = local_maps[row[mine]]
    return out


def pass_maps(attention: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """AMT's map from the last block's cls attention: ``[B, heads, N]`` -> ``[B, grid_h, grid_w] float32``,
    each head min-max normalised over the tokens (zeros where a head is constant), then the heads averaged."""
    low = attention.min(axis=-1, keepdims=True)
    high = attention.max(axis=-1, keepdims=True)
    scaled = (attention - low) / jnp.where(high > low, high - low, 1.0)
    return scaled.mean(axis=1).reshape(-1, *grid)


def crop_maps(maps: np.ndarray, crops: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Maps of whole images cut and mirrored as ``RandomResizedCropFlip`` cut and mirrored the images.

    ``maps [B, h, w]`` (cell ``(r, c)`` covers rows ``[r / h, (r + 1) / h)`` and columns ``[c / w,
    (c + 1) / w)`` of the decoded image, as fractions), ``crops [B, 5]`` (``RandomResizedCropFlip``'s
    ``'crop'``: top, left, height, width as fractions, flip) -> ``[B, grid_h, grid_w] float32``: each
    token of the augmented image takes the map bilinearly interpolated at its centre (values held
    constant beyond the outer cell centres), then the columns are reversed where the image was mirrored.
    """
    maps = np.asarray(maps, np.float32)
    crops = np.asarray(crops, np.float64)
    batch, map_h, map_w = maps.shape

    def taps(start, extent, tokens, cells):
        """``(lower cell, upper cell, upper weight)``, each ``[B, tokens]``, at the tokens' centres."""
        centres = start[:, None] + extent[:, None] * (np.arange(tokens) + 0.5) / tokens
        position = np.clip(centres * cells - 0.5, 0, cells - 1)
        lower = np.floor(position).astype(np.int64)
        return lower, np.minimum(lower + 1, cells - 1), (position - lower).astype(np.float32)

    row_low, row_high, row_weight = taps(crops[:, 0], crops[:, 2], grid[0], map_h)
    col_low, col_high, col_weight = taps(crops[:, 1], crops[:, 3], grid[1], map_w)
    images = np.arange(batch)[:, None, None]

    def at(rows, cols):
        return maps[images, rows[:, :, None], cols[:, None, :]]

    col_weight = col_weight[:, None, :]
    upper = at(row_low, col_low) * (1 - col_weight) + at(row_low, col_high) * col_weight
    lower = at(row_high, col_low) * (1 - col_weight) + at(row_high, col_high) * col_weight
    out = upper + (lower - upper) * row_weight[:, :, None]
    mirrored = crops[:, 4] > 0.5
    out[mirrored] = out[mirrored, :, ::-1]
    return out


class AttentionMaps:
    """The ``amt`` sampler's state for one run (``methods.HostState``): the trainer calls ``sample`` on every
    host batch, ``refresh`` after every step, and saves / restores ``state_dict`` with its checkpoints.

    ``method`` is a ``ThrowingMethod`` with sampler ``amt``; ``placement`` the run's mesh and rules;
    ``global_batch`` its batch (also the map pass's).
    """

    def __init__(self, method, placement: sharding.Placement, global_batch: int):
        config = method.config
        self.method, self.layout = method, method.layout
        self.data = config.data
        self.placement = placement
        self.pass_batch = global_batch
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.num_examples = len(pipeline.make_source(self.data, self.data.split))
        self.steps = refresh_steps(
            self.num_examples,
            global_batch,
            config.total_steps,
            config.method.amt_warmup_epochs,
            config.method.amt_interval,
        )
        rows = len(local_indices(self.num_examples, self.pass_batch, self.process_count, self.process_index))
        self.maps = np.ones((rows, *self.layout.grid), MAP_DTYPE)  # AMT's initial weights: a uniform draw
        self.refreshed_at = -1  # the step after which the maps were last computed; -1: never (warm-up)
        encoder, _ = method.encoder()
        grid = self.layout.grid
        self._pass = jax.jit(
            lambda params, images: pass_maps(
                attention_lib.last_block_cls_attention(encoder, {"params": params}, method.normalize(images))[1], grid
            )
        )

    # --- per step ---

    def sample(self, batch: dict) -> dict:
        """A host batch (``'token_noise' [b, 2, N]``, ``'index' [b]``, ``'crop' [b, 5]`` and the rest) ->
        the training batch: those three replaced by ``ids_visible / ids_decoded / ids_thrown``. Before the first
        map, AMT's random masking at ``amt_warmup_mask_ratio`` with nothing thrown (``Throwing.warmup_layout``):
        those batches have other token counts, so the step compiles once more when the maps arrive."""
        batch = dict(batch)
        noise, index, crops = batch.pop("token_noise"), batch.pop("index"), batch.pop("crop")
        warmup = self.method.throwing.warmup_layout
        if self.refreshed_at < 0 and warmup is not None:
            ids = masking.sample("random", noise, warmup)
        else:
            weights = None
            if self.refreshed_at >= 0:
                weights = crop_maps(self._maps_of(np.asarray(index)), crops, self.layout.grid).reshape(len(index), -1)
            ids = masking.sample("amt", noise, self.layout, weights)
        return batch | {"ids_visible": ids.visible, "ids_decoded": ids.decoded, "ids_thrown": ids.thrown}

    def _maps_of(self, index: np.ndarray) -> np.ndarray:
        """``[b, h, w]``: the maps of this process's batch rows (source indices ``index``), from every process."""
        if self.process_count == 1:
            return self.maps[index]
        everyone = np.asarray(multihost_utils.process_allgather(index)).reshape(-1)
        mine = share(self.maps, everyone, self.pass_batch, self.process_count, self.process_index)
        maps = np.asarray(multihost_utils.process_allgather(mine)).sum(axis=0, dtype=np.float32)
        return maps.reshape(self.process_count, len(index), *maps.shape[1:])[self.process_index]

    # --- the periodic pass ---

    def refresh(self, step: int, params) -> str | None:
        """After ``step`` steps: recomputes the maps with the encoder of the trained ``params`` when AMT's schedule
        says so; returns a line for the log then, else None. Every process calls it."""
        if step not in self.steps or step <= self.refreshed_at:
            return None
        start = time.perf_counter()
        _, encoder_params = self.method.encoder(params)
        dataset = pipeline.eval_dataset(
            pipeline.in_process(self.data),
            self.data.split,
            batch_size=self.pass_batch,
            process_index=self.process_index,
            process_count=self.process_count,
            whole_image=True,
        )
        local = self.pass_batch // self.process_count
        spec = self.placement.batch_sharding.spec
        # A new array, not written in place: a checkpoint being saved in the background keeps the old one.
        fresh = np.empty_like(self.maps)
        for k, batch in enumerate(dataset):
            images = self.placement.global_batch(batch["images"])
            with self.placement.active():
                maps = self._pass(encoder_params, images)
            maps = multihost_utils.global_array_to_host_local_array(maps, self.placement.mesh, spec)
            fresh[k * local : (k + 1) * local] = np.asarray(maps).astype(MAP_DTYPE)
        self.maps, self.refreshed_at = fresh, step
        seconds = time.perf_counter() - start
        return (
            f"AMT: attention maps of {self.num_examples} images computed after step {step} in {seconds:.1f} s "
            f"(next after step {next((s for s in self.steps if s > step), 'none')})"
        )

    # --- checkpoints ---

    def state_dict(self) -> dict[str, np.ndarray]:
        """This process's share, for its checkpoint: ``maps [rows, h, w] float16`` and ``refreshed_at``."""
        return {"maps": self.maps, "refreshed_at": np.asarray(self.refreshed_at, np.int64)}

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays["maps"].shape != self.maps.shape:
            raise ValueError(
                f"the checkpoint's attention maps have shape {arrays['maps'].shape}, this run's {self.maps.shape}: "
                "resume with the run's own data, batch size and token grid."
            )
        self.maps = np.array(arrays["maps"], MAP_DTYPE)
        self.refreshed_at = int(arrays["refreshed_at"])
