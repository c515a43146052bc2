"""AMT's attention maps (prmim_jax.attention_maps): the encoder's last-block cls attention, maps that follow
each image's crop and flip, the refresh schedule, the split across processes, and a whole run that refreshes
its maps when AMT's schedule says and resumes them bit for bit."""

import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_model_config
from PIL import Image
from test_train import losses_by_step, read_metrics, tiny_config

from prmim_jax import attention_maps, methods, train
from prmim_jax.data import pipeline, schema, transforms
from prmim_jax.models import attention as attention_lib
from prmim_jax.models import mae, vit

# --- the encoder's cls attention ------------------------------------------------------------------------


def test_last_block_cls_attention_is_the_softmax_of_the_last_blocks_cls_query():
    encoder = vit.encoder_like(mae.build_mae(tiny_model_config()))  # 14x14 tokens, 4 heads, 2 blocks
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 28, 28, 1)).astype(np.float32))
    params = nn.unbox(jax.jit(encoder.init)(jax.random.key(0), images))["params"]
    tokens, attention = attention_lib.last_block_cls_attention(encoder, {"params": params}, images)
    # Nothing else changes: the same tokens, bit for bit, as a plain apply.
    np.testing.assert_array_equal(tokens, encoder.apply({"params": params}, images))
    assert attention.shape == (2, 4, 196) and attention.dtype == jnp.float32
    # Reference: the last block's normalised input, its query and key kernels, softmax over cls and patches.
    last = f"block_{encoder.depth - 1}"
    _, captured = encoder.apply(
        {"params": params}, images, capture_intermediates=lambda module, _: module.name == "norm1"
    )
    normed = captured["intermediates"]["transformer"][last]["norm1"]["__call__"][0]
    block = params["transformer"][last]["attn"]
    query, key = (jnp.einsum("btd,dhk->bthk", normed, block[n]["kernel"]) + block[n]["bias"] for n in ("query", "key"))
    logits = jnp.einsum("bhk,bthk->bht", query[:, 0], key) / math.sqrt(query.shape[-1])
    np.testing.assert_allclose(attention, jax.nn.softmax(logits, -1)[:, :, 1:], rtol=1e-5, atol=1e-7)


def test_pass_maps_min_max_normalise_each_head_then_average():
    attention = jnp.asarray([[[0.1, 0.3, 0.2, 0.4], [0.5, 0.5, 0.5, 0.5]]])  # [1, 2 heads, 4 tokens]
    maps = attention_maps.pass_maps(attention, (2, 2))
    # Head 0 -> (0, 2/3, 1/3, 1); head 1 is constant -> zeros (AMT would divide by zero); averaged.
    np.testing.assert_allclose(maps, [[[0.0, 1 / 3], [1 / 6, 0.5]]], rtol=1e-6)


# --- maps follow the augmentation -----------------------------------------------------------------------


def test_a_hot_spot_moves_where_the_crop_and_the_flip_say():
    hot = np.zeros((1, 8, 8), np.float32)
    hot[0, 1, 5] = 1.0
    top_right_quarter = np.array([[0.0, 0.5, 0.5, 0.5, 0.0]])  # top, left, height, width, flip
    for flip, columns in ((0.0, [2, 3]), (1.0, [4, 5])):
        crop = top_right_quarter.copy()
        crop[0, 4] = flip
        cropped = attention_maps.crop_maps(hot, crop, (8, 8))[0]
        peak = np.argwhere(cropped == cropped.max())
        # Cell (1, 5) of the whole image is twice as large in the quarter: tokens (2..3, 2..3), mirrored (2..3, 4..5).
        assert sorted(map(tuple, peak)) == [(r, c) for r in (2, 3) for c in columns]
    whole = np.array([[0.0, 0.0, 1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(attention_maps.crop_maps(hot, whole, (8, 8)), hot)


def test_the_map_of_an_image_follows_its_random_resized_crop_and_flip():
    image = np.zeros((28, 28, 1), np.uint8)
    image[4:12, 16:24] = 255  # a bright square over tokens (1..2, 4..5) of the 7x7 grid
    hot = np.zeros((1, 7, 7), np.float32)
    hot[0, 1:3, 4:6] = 1.0  # its map, as the map pass would give it at the token grid
    crop = transforms.RandomResizedCropFlip(28, record=True)

    def centre(values):
        rows, cols = np.indices(values.shape)
        return np.array([(values * rows).sum(), (values * cols).sum()]) / values.sum()

    checked = mirrored = 0
    for seed in range(60):
        out = crop.random_map({"image": image}, np.random.default_rng(seed))
        tokens = out["image"][..., 0].astype(np.float32).reshape(7, 4, 7, 4).mean((1, 3))
        if tokens.sum() < 4 * 255:  # the square (mostly) cut away
            continue
        cropped = attention_maps.crop_maps(hot, out["crop"][None], (7, 7))[0]
        np.testing.assert_allclose(centre(cropped), centre(tokens), atol=0.35, err_msg=f"seed {seed}")
        checked += 1
        mirrored += out["crop"][4] == 1.0
    assert checked > 30 and 0 < mirrored < checked


# --- schedule and processes -----------------------------------------------------------------------------


def test_refresh_steps_follow_amts_epochs():
    # AMT's ImageNet run: 400 epochs, maps after epochs 40, 80, ..., 360 (epochs counted from 0), batch 4096.
    steps = attention_maps.refresh_steps(1281167, 4096, math.ceil(400 * 1281167 / 4096), 40, 40)
    assert steps == tuple(math.ceil((e + 1) * 1281167 / 4096) for e in range(40, 400, 40))
    assert len(steps) == 9
    assert attention_maps.refresh_steps(8, 8, 6, warmup_epochs=1, interval=2) == (3, 5)
    assert attention_maps.refresh_steps(8, 8, 6, warmup_epochs=0, interval=1) == (1, 2, 3, 4, 5)


def test_each_process_keeps_a_share_and_the_shares_add_up_to_every_map():
    num_examples, pass_batch, processes = 21, 8, 2
    every = np.random.default_rng(0).random((num_examples, 3, 3)).astype(np.float16)
    shares = []
    for process in range(processes):
        indices = attention_maps.local_indices(num_examples, pass_batch, processes, process)
        owner, row = attention_maps.owner_and_row(np.maximum(indices, 0), pass_batch, processes)
        real = indices >= 0
        assert (owner[real] == process).all() and (row[real] == np.arange(len(indices))[real]).all()
        shares.append(np.where(real[:, None, None], every[np.maximum(indices, 0)], 0))
    assert sum(len(s) for s in shares) == 2 * 3 * 4  # ceil(21 / 8) batches of 4 rows on each process
    batch = np.array([20, 3, 11, 0, 7, 12, 5, 16])  # one global batch of the shuffled stream
    total = sum(attention_maps.share(s, batch, pass_batch, processes, p) for p, s in enumerate(shares))
    np.testing.assert_array_equal(total, every[batch])


def test_the_map_pass_reads_each_process_the_rows_it_keeps():
    data = schema.data_config(source="fashion_mnist")
    source = pipeline.make_source(data, "train")
    dataset = pipeline.eval_dataset(data, "train", batch_size=8, process_index=1, process_count=2, whole_image=True)
    first = next(iter(dataset))
    indices = attention_maps.local_indices(len(source), 8, 2, 1)[:4]
    expected = np.stack([transforms.decode_image(source[int(i)]["image"], 1) for i in indices])
    np.testing.assert_array_equal(first["images"], expected)


# --- a whole run ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_images(tmp_path_factory):
    """``root/train/c{0,1}/``: eight grayscale PNGs of different shapes (one 8-image batch is an epoch)."""
    root = tmp_path_factory.mktemp("amt_folder")
    rng = np.random.default_rng(0)
    for k in range(8):
        folder = root / "train" / f"c{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24 + 2 * k, 30), dtype=np.uint8)).save(folder / f"{k}.png")
    return root


def amt_config(root, **overrides):
    """MAE + PR-MIM with AMT's sampler on eight images: warm-up 1 epoch, maps after epochs 2 and 4."""
    config = tiny_config(batch_size=8, checkpoint_every=100, **overrides)
    config.method = methods.method_config(
        "mae", reconstruction="progressive", sampler="amt", throw_ratio=0.25, amt_warmup_epochs=1, amt_interval=2
    )
    config.data = schema.data_config(
        source="image_folder", path=str(root), image_size=28, channels=1, mean=(0.5,), std=(0.25,), eval_split="train"
    )
    config.evals = ml_collections.ConfigDict()
    return config


def saved_maps(workdir, step):
    with np.load(pathlib.Path(workdir) / "checkpoints" / str(step) / "host" / "process_0-of-1.npz") as saved:
        return saved["maps"], int(saved["refreshed_at"])


def refreshes(workdir):
    return [row["step"] for row in read_metrics(workdir) if "host_state_refresh_seconds" in row]


def test_amt_run_refreshes_its_maps_on_schedule_and_resumes_them_bit_for_bit(tmp_path, eight_images):
    straight = amt_config(eight_images)
    assert train.train_and_evaluate(straight, str(tmp_path / "straight"))["step"] == 6
    assert refreshes(tmp_path / "straight") == [3, 5]  # after epochs 2 and 4 (one step an epoch)
    maps, refreshed_at = saved_maps(tmp_path / "straight", 6)
    assert refreshed_at == 5 and maps.shape == (8, 7, 7) and maps.dtype == np.float16
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and np.ptp(maps) > 0.1  # no longer AMT's initial ones

    # Stopped right after the first refresh: the checkpoint holds the new maps, and the resumed run does not
    # recompute them; it refreshes once more after step 5 and ends where the straight run ends.
    chunked = amt_config(eight_images, stop_after=3)
    assert train.train_and_evaluate(chunked, str(tmp_path / "chunked"))["stopped"]
    assert saved_maps(tmp_path / "chunked", 3)[1] == 3
    assert train.train_and_evaluate(chunked, str(tmp_path / "chunked"))["step"] == 6
    assert refreshes(tmp_path / "chunked") == [3, 5]
    assert losses_by_step(tmp_path / "chunked") == losses_by_step(tmp_path / "straight")
    np.testing.assert_array_equal(saved_maps(tmp_path / "chunked", 6)[0], maps)
