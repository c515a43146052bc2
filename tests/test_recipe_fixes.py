"""The official behaviours the recipes needed beyond their numbers: SimMIM's step schedule and its fine-tuning
encoder, each framework's weight-decay rule, MFF's crop, GreenMIM's init, TEC's adaptor in fine-tuning, AMT's
warm-up."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_train import tiny_config

from prmim_jax import attention_maps, methods, optim, sharding
from prmim_jax.data import transforms
from prmim_jax.models import greenmim, layers, simmim, vit


def test_multistep_schedule_warms_up_then_steps_down_after_each_decay_step():
    # SimMIM's ViT pretraining: linear warmup, then x0.1 after epoch 700 of 800 (here step 70 of 80).
    config = optim.optimizer_config(base_lr=1e-3, warmup_steps=10, schedule="multistep", decay_steps=(70,))
    schedule = optim.learning_rate_schedule(config, global_batch=256, total_steps=80)
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == float(schedule(69)) == pytest.approx(1e-3)
    assert float(schedule(70)) == float(schedule(80)) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match=r"decay_steps=\(5,\) must be increasing steps after the warmup \(10\)"):
        config.decay_steps = (5,)
        optim.learning_rate_schedule(config, 256, 80)


def test_weight_decay_spares_what_each_recipe_names():
    params = {
        "cls_token": jnp.ones((1, 1, 4)),
        "block": {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}, "norm": {"scale": jnp.ones(4)}},
        "fusion": {"weights": jnp.ones(6)},
    }

    def decayed(no_decay):
        mask = optim.weight_decay_mask(params, no_decay)
        return sorted(
            "/".join(layers.path_names(p)) for p, decays in jax.tree_util.tree_leaves_with_path(mask) if decays
        )

    # timm 0.3.2's add_weight_decay (MAE, LocalMIM, TEC pretraining): every tensor of 2+ dimensions.
    assert decayed(("1d",)) == ["block/dense/kernel", "cls_token"]
    # mmpretrain's MFF: names only, so its 1-D fusion weights are decayed.
    assert decayed(("bias", "scale", "cls_token")) == ["block/dense/kernel", "fusion/weights"]


def test_mff_crop_resizes_the_short_side_pads_by_reflection_and_cuts_at_random():
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    crop = transforms.ResizePadCropFlip(20, padding=4, flip=False, record=True)
    resized = np.asarray(Image.fromarray(image).resize((26, 20), Image.Resampling.BILINEAR))  # torchvision Resize(20)
    padded = np.pad(resized, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    seen = set()
    for seed in range(40):
        out = crop.random_map({"image": image}, np.random.default_rng(seed))
        top, left = (round(v) for v in (out["crop"][0] * 20 + 4, out["crop"][1] * 26 + 4))
        np.testing.assert_array_equal(out["image"], padded[top : top + 20, left : left + 20])
        seen.add((top, left))
    assert len(seen) > 20  # offsets anywhere in the padded image, not only inside the resized one
    assert min(t for t, _ in seen) == 0 or min(left for _, left in seen) == 0


def test_greenmim_init_draws_every_encoder_kernel_xavier_uniform_with_pytorchs_fans():
    # LayneH/GreenMIM modeling/base_green_models.py: xavier-uniform for every Linear (the fused qkv is one
    # [3D, D] matrix) and for the patch conv viewed as [out, in * p * p]; biases and the decoder are left alone.
    width, heads, patch = 64, 4, 4 * 4 * 3
    zeros = np.zeros
    params = {
        "encoder": {
            "patch_embed": {"kernel": zeros((patch, width)), "bias": zeros(width)},
            "stage_0": {
                "block_0": {
                    "attention": {
                        "query": {"kernel": zeros((width, heads, width // heads))},
                        "out": {"kernel": zeros((heads, width // heads, width))},
                    },
                    "mlp": {"fc1": {"kernel": zeros((width, 4 * width)), "bias": zeros(4 * width)}},
                }
            },
        },
        "decoder": {"kernel": zeros((width, width))},
    }
    drawn = greenmim.xavier_init(params, jax.random.key(0))
    encoder, block = drawn["encoder"], drawn["encoder"]["stage_0"]["block_0"]
    for kernel, (fan_in, fan_out) in (
        (encoder["patch_embed"]["kernel"], (patch, width)),
        (block["attention"]["query"]["kernel"], (width, 3 * width)),
        (block["attention"]["out"]["kernel"], (width, width)),
        (block["mlp"]["fc1"]["kernel"], (width, 4 * width)),
    ):
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        kernel = np.asarray(kernel)
        assert 0.95 * bound < np.abs(kernel).max() <= bound
        assert np.std(kernel) == pytest.approx(bound / np.sqrt(3), rel=0.1)
    assert not np.asarray(block["mlp"]["fc1"]["bias"]).any() and not np.asarray(encoder["patch_embed"]["bias"]).any()
    assert not np.asarray(drawn["decoder"]["kernel"]).any()  # the decoder keeps MAE's own init


def test_simmim_fine_tuning_encoder_starts_every_block_from_the_shared_table_and_computes_the_same():
    shared = simmim.SimMIMEncoder(
        patch_size=4,
        image_size=(28, 28),
        channels=1,
        width=32,
        depth=2,
        num_heads=4,
        mlp_dim=64,
        relative_position_bias="shared",
    )
    images = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    params = nn.unbox(shared.init(jax.random.key(0), images)["params"])
    table = jax.random.normal(jax.random.key(2), params["relative_position_bias"].shape)
    params = jax.tree.map(np.asarray, params | {"relative_position_bias": table})
    per_block = shared.clone(relative_position_bias="per_block")
    adapted = per_block.adapt_pretrained(params, shared)
    assert "relative_position_bias" not in adapted
    for i in range(2):
        np.testing.assert_array_equal(adapted["transformer"][f"block_{i}"]["relative_position_bias"], table)
    np.testing.assert_allclose(
        per_block.apply({"params": adapted}, images), shared.apply({"params": params}, images), atol=1e-5
    )
    # SimMIM's layer decay (optimizer.py get_vit_layer): a block's own table is its block's, a shared one the head's.
    assert per_block.layer_id(["transformer", "block_1", "relative_position_bias"]) == 2
    assert shared.layer_id(["relative_position_bias"]) == 3


def test_tec_fine_tuning_gives_the_cls_token_and_its_adaptor_the_heads_learning_rate():
    # sail-sg/TEC util/lr_decay.py L68-77: the cls token's layer id -1 reads the last (unit) scale.
    tec = vit.Encoder(
        patch_size=4,
        image_size=(28, 28),
        width=32,
        depth=2,
        num_heads=4,
        mlp_dim=64,
        cls_token_mlp=True,
        learned_pos_embedding=False,
    )
    mae = tec.clone(cls_token_mlp=False, learned_pos_embedding=True)
    assert tec.layer_id(["cls_token"]) == tec.layer_id(["cls_token_mlp", "fc1", "kernel"]) == 3
    assert mae.layer_id(["cls_token"]) == 0 and tec.layer_id(["patch_embed", "kernel"]) == 0


def test_amt_masks_at_random_with_nothing_thrown_until_its_first_map():
    # guijiejie/AMT mae-AMT/models_mae.py L207-210: until the first map, 75% masked at random, nothing thrown.
    config = tiny_config(batch_size=8)
    config.method = methods.method_config(
        "mae", reconstruction="partial", sampler="amt", mask_ratio=0.846, throw_ratio=0.4, amt_warmup_mask_ratio=0.75
    )
    method = methods.build(config)
    maps = attention_maps.AttentionMaps(method, sharding.Placement.from_config(config.sharding), global_batch=8)
    rng = np.random.default_rng(0)
    batch = {
        "token_noise": rng.random((8, 2, 49), dtype=np.float32),
        "index": np.arange(8),
        "crop": np.tile(np.array([0, 0, 1, 1, 0], np.float32), (8, 1)),
    }
    warm = maps.sample(batch)
    assert warm["ids_visible"].shape == (8, 12) and warm["ids_thrown"].shape == (8, 0)  # 49 x 0.25 visible
    maps.refreshed_at, maps.maps[:8] = 0, rng.random((8, 7, 7))  # a map has come
    drawn = maps.sample(batch)
    layout = method.throwing.layout
    assert drawn["ids_thrown"].shape == (8, layout.num_thrown) and layout.num_thrown == round(49 * 0.4)
    assert drawn["ids_visible"].shape == (8, layout.num_visible) and layout.num_visible < 12
