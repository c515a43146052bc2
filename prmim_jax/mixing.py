"""Mixup / cutmix and label smoothing on device, in the jitted train step (MAE's fine-tuning, its Table 14).

Pure ``jax.numpy`` with static shapes, on the sharded global batch:

- ``mix_batch``: timm's ``Mixup`` in ``'batch'`` mode, with label smoothing.
- ``smooth_targets``: the smoothed one-hot targets, for when mixing is off.

The host-side augmentations (RandAugment, random erasing) are ``prmim_jax.data.augment``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """``labels`` ``[B] int`` -> ``[B, num_classes] float32`` smoothed one-hot targets, as timm's.

    The label's entry is ``1 - label_smoothing + label_smoothing / num_classes``,
    every other entry ``label_smoothing / num_classes``; each row sums to 1.
    """
    off = label_smoothing / num_classes
    on = 1.0 - label_smoothing + off
    one_hot = labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)
    return jnp.where(one_hot, jnp.float32(on), jnp.float32(off))


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """timm's ``rand_bbox``: a ``[height, width] bool`` box mask and the corrected ``lam`` (``[] float32``).

    Box sides ``int(H sqrt(1 - lam))`` x ``int(W sqrt(1 - lam))``, centred on a
    uniform pixel and clipped to the image (the half sides rounded down, so the
    unclipped box is ``2 (cut // 2)`` long). The corrected ``lam`` is the
    fraction of the image outside the box.
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    key_y, key_x = jax.random.split(rng)
    center_y = jax.random.randint(key_y, (), 0, height)
    center_x = jax.random.randint(key_x, (), 0, width)
    top, bottom = jnp.clip(center_y - cut_h // 2, 0, height), jnp.clip(center_y + cut_h // 2, 0, height)
    left, right = jnp.clip(center_x - cut_w // 2, 0, width), jnp.clip(center_x + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    corrected = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
    return box, corrected


def mix_batch(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """timm's ``Mixup(mode='batch')``: ``images [B, H, W, C]`` float, ``labels [B] int`` -> ``(images, targets)``.

    Returns ``images`` ``[B, H, W, C]`` (same dtype) and ``targets`` ``[B,
    num_classes] float32``, rows summing to 1. One draw for the whole batch:
    with probability ``prob`` it is mixed, by cutmix with probability
    ``switch_prob`` when both alphas are > 0 (else by whichever is > 0), with
    ``lam ~ Beta(alpha, alpha)`` of the chosen method. Image ``i`` is mixed with
    image ``B - 1 - i`` (the batch reversed, timm's ``x.flip(0)``):

    - mixup: ``lam * x[i] + (1 - lam) * x[B - 1 - i]``;
    - cutmix: ``x[i]`` with the box of ``cutmix_box`` pasted from
      ``x[B - 1 - i]``, ``lam`` corrected to the unpasted area fraction.

    ``targets = lam * smooth(y) + (1 - lam) * smooth(y reversed)`` with
    ``smooth_targets(., num_classes, label_smoothing)``; unmixed, ``lam = 1``.

    Jittable (the alphas and probabilities are static Python floats: bind them
    with ``functools.partial``), with a batch sharded over devices. The pairing
    reverses the whole global batch, not each device's part (under DDP, MAE's
    timm mixes each GPU's local batch): XLA moves the reversed images between
    devices, one permutation of the batch per step, small beside the model.
    The pairs are as random either way, since batches are random draws of the
    shuffled data, and this way the result does not depend on the device count.
    """
    if not num_classes >= 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1.")
    for name, value in (("prob", prob), ("switch_prob", switch_prob), ("label_smoothing", label_smoothing)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must lie in [0, 1].")
    if mixup_alpha < 0 or cutmix_alpha < 0 or (prob > 0 and mixup_alpha == cutmix_alpha == 0):
        raise ValueError(
            f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}: both must be >= 0 and one > 0 "
            "(set prob=0 to turn mixing off, or use smooth_targets)."
        )
    height, width = images.shape[1:3]
    key_apply, key_switch, key_mixup, key_cutmix, key_box = jax.random.split(rng, 5)
    do_mix = jax.random.uniform(key_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(key_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mixup = jax.random.beta(key_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
    lam_cutmix = jax.random.beta(key_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
    box, lam_cutmix = cutmix_box(key_box, lam_cutmix, height, width)

    reversed_images = images[::-1]
    lam = jnp.where(do_mix, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0).astype(jnp.float32)
    blended = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * reversed_images
    pasted = jnp.where(box[None, :, :, None], reversed_images, images)
    mixed = jnp.where(do_mix, jnp.where(use_cutmix, pasted, blended), images)

    targets = smooth_targets(labels, num_classes, label_smoothing)
    targets = lam * targets + (1.0 - lam) * targets[::-1]
    return mixed, targets
