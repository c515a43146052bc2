"""Robustness evaluation: accuracy counting, the 200-class masks, ImageNet-C's mCE, and runs on mock TFDS data."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from prmim_jax import distributed
from prmim_jax.data import pipeline, schema, sources
from prmim_jax.evaluate import robustness
from prmim_jax.tools import robustness as robustness_tool

NUM_CLASSES = 1000
# Wnids of each dataset's README / Hendrycks' eval.py, with their position in ImageNet-1k's sorted wnids.
IMAGENET_A_SPOT_CHECKS = {"n01498041": 6, "n01531178": 11, "n02504458": 386, "n04591713": 907, "n12267677": 988}
IMAGENET_R_SPOT_CHECKS = {"n01443537": 1, "n01484850": 2, "n02106662": 235, "n07768694": 957, "n12267677": 988}
NOT_IN_EITHER = {"n01440764": 0, "n15075141": 999}  # tench, toilet tissue


def one_hot_logits(classes, width=NUM_CLASSES, low=0.0):
    logits = np.full((len(classes), width), low, np.float32)
    logits[np.arange(len(classes)), classes] = 1.0
    return logits


def batch(labels, mask):
    return {
        "images": np.zeros((len(labels), 2, 2, 3), np.float32),
        "labels": np.asarray(labels),
        "mask": np.asarray(mask),
    }


def imagenet_wnids():
    path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
    return path.read_text().split()


# --- counting and masking ------------------------------------------------------------------------


def test_padding_rows_count_nowhere():
    # Predicts label 7 everywhere: right on rows whose label is 7, padding rows included.
    predict = lambda images: one_hot_logits([7] * len(images))  # noqa: E731
    batches = [batch([7, 3, 7, 7], [True, True, False, False]), batch([7, 7, 1, 1], [True, False, False, False])]
    correct, count, outside = robustness.count_correct(predict, batches)
    assert (correct, count, outside) == (2, 3, 0)


def test_class_subset_moves_the_argmax_to_the_best_class_inside_it():
    subset = (2, 5, 9)
    logits = np.array([[0.0, 9.0, 1.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 2.0, 0.0]])  # argmax 1, outside the subset
    assert robustness.predictions(logits).tolist() == [1]
    assert robustness.predictions(logits, subset).tolist() == [5]
    assert robustness.predictions(logits, (9, 5, 2)).tolist() == [5]  # the subset's order does not matter
    # The same through count_correct: label 5 becomes right, label 1 (outside the subset) never is.
    predict = lambda images: np.repeat(logits, len(images), 0)  # noqa: E731
    counts = robustness.count_correct(predict, [batch([5, 1, 5], [True, True, False])], subset)
    assert counts.tolist() == [1, 2, 1]


def test_class_subset_matches_hendrycks_column_selection():
    # eval.py scores logits[:, indices_in_1k] against 0..199 targets; our masked argmax gives the same classes.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, NUM_CLASSES)).astype(np.float32)
    for subset in (robustness.IMAGENET_A_CLASSES, robustness.IMAGENET_R_CLASSES):
        columns = np.asarray(subset)[logits[:, list(subset)].argmax(1)]
        assert (robustness.predictions(logits, subset) == columns).all()


def test_class_subset_outside_the_logits_is_rejected():
    with pytest.raises(ValueError, match="class_subset"):
        robustness.predictions(np.zeros((2, 10)), (3, 10))


# --- the 200-class subsets -----------------------------------------------------------------------


@pytest.mark.parametrize("subset", [robustness.IMAGENET_A_CLASSES, robustness.IMAGENET_R_CLASSES])
def test_subsets_are_200_sorted_unique_imagenet_classes(subset):
    assert len(subset) == 200 and len(set(subset)) == 200
    assert list(subset) == sorted(subset) and subset[0] >= 0 and subset[-1] < NUM_CLASSES
    assert all(isinstance(c, int) for c in subset)


def test_subsets_hold_known_wnids_at_their_tfds_label_index():
    wnids = imagenet_wnids()
    assert len(wnids) == NUM_CLASSES and wnids == sorted(wnids)  # TFDS's ClassLabel order: sorted wnids
    for subset, checks in [
        (robustness.IMAGENET_A_CLASSES, IMAGENET_A_SPOT_CHECKS),
        (robustness.IMAGENET_R_CLASSES, IMAGENET_R_SPOT_CHECKS),
    ]:
        for wnid, index in checks.items():
            assert wnids.index(wnid) == index and index in subset, wnid
        for wnid, index in NOT_IN_EITHER.items():
            assert wnids.index(wnid) == index and index not in subset
    assert robustness.DATASET_CLASS_SUBSETS == {
        "imagenet_a": robustness.IMAGENET_A_CLASSES,
        "imagenet_r": robustness.IMAGENET_R_CLASSES,
    }


# --- ImageNet-C's mCE ----------------------------------------------------------------------------


def alexnet_like_errors(scale=1.0, spread=0.0):
    """Errors whose severity mean is ``scale`` times AlexNet's, spread ``spread`` around it."""
    return {
        (c, s): scale * robustness.ALEXNET_ERRORS[c] + spread * (s - 3)
        for c in robustness.IMAGENET_C_CORRUPTIONS
        for s in robustness.IMAGENET_C_SEVERITIES
    }


def test_mce_is_one_for_alexnets_errors_and_scales_with_them():
    assert len(robustness.IMAGENET_C_CORRUPTIONS) == 15 == len(robustness.ALEXNET_ERRORS)
    summary = robustness.corruption_errors(alexnet_like_errors(spread=0.02))
    assert summary["mce"] == pytest.approx(1.0)
    assert all(ce == pytest.approx(1.0) for ce in summary["ce"].values()) and len(summary["ce"]) == 15
    assert summary["mean_error"] == pytest.approx(np.mean(list(robustness.ALEXNET_ERRORS.values())))
    half = robustness.corruption_errors(alexnet_like_errors(scale=0.5))
    assert half["mce"] == pytest.approx(0.5) and half["mean_error"] == pytest.approx(summary["mean_error"] / 2)
    # CE weighs each corruption by AlexNet's error: one corruption at zero error lowers mCE by 1/15.
    errors = alexnet_like_errors() | {("fog", s): 0.0 for s in robustness.IMAGENET_C_SEVERITIES}
    assert robustness.corruption_errors(errors)["mce"] == pytest.approx(14 / 15)


def test_extra_corruptions_get_errors_but_no_ce():
    errors = alexnet_like_errors() | {("saturate", s): 0.1 * s for s in robustness.IMAGENET_C_SEVERITIES}
    summary = robustness.corruption_errors(errors)
    assert summary["mean_errors"]["saturate"] == pytest.approx(0.3) and "saturate" not in summary["ce"]
    assert summary["mce"] == pytest.approx(1.0)


def test_corruption_errors_names_what_is_missing():
    errors = alexnet_like_errors()
    del errors["frost", 4]
    with pytest.raises(ValueError, match=r"frost lacks severities \[4\]"):
        robustness.corruption_errors(errors)
    partial = {k: v for k, v in alexnet_like_errors().items() if k[0] != "snow"}
    with pytest.raises(ValueError, match=r"missing: \['snow'\]"):
        robustness.corruption_errors(partial)
    lenient = robustness.corruption_errors(partial, require_all=False)
    assert lenient["mce"] is None and len(lenient["ce"]) == 14
    with pytest.raises(ValueError, match="severity 6"):
        robustness.corruption_errors(alexnet_like_errors() | {("fog", 6): 0.5})
    with pytest.raises(ValueError, match="unknown ImageNet-C corruption 'fogg'"):
        robustness.corruption_errors(alexnet_like_errors() | {("fogg", 1): 0.5})
    with pytest.raises(ValueError, match=r"not a fraction"):
        robustness.corruption_errors(alexnet_like_errors() | {("fog", 1): 55.0})


def test_names_and_default_splits():
    assert robustness.imagenet_c_name("gaussian_noise", 3) == "imagenet2012_corrupted/gaussian_noise_3"
    with pytest.raises(ValueError, match="severity"):
        robustness.imagenet_c_name("fog", 0)
    assert robustness.default_split("imagenet_a") == "test"
    assert robustness.default_split("imagenet_v2/topimages") == "test"
    assert robustness.default_split("imagenet2012_corrupted/fog_1") == "validation"
    with pytest.raises(ValueError, match="cifar10:SPLIT"):
        robustness.default_split("cifar10")
    assert robustness.parse_datasets("imagenet_a, imagenet_v2/topimages:test[:10%]") == [
        ("imagenet_a", None),
        ("imagenet_v2/topimages", "test[:10%]"),
    ]


# --- on mock TFDS data ---------------------------------------------------------------------------

NUM_EXAMPLES = 5  # with batch 4: two batches, the second with 3 padding copies of example 0
BATCH = 4


@pytest.fixture
def mock_tfds():
    # USE_CODE mocks tfds.data_source (what TfdsSource reads) from the builders' features; labels are
    # random ImageNet-1k indices, the same for every configuration.
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def base_config():
    """The fine-tuning run's data section, as load_classifier would return it (small images)."""
    return schema.data_config(source="tfds", name="imagenet2012", image_size=16)


def true_labels(name, split):
    source = sources.TfdsSource(name, split)
    return np.array([source[i]["label"] for i in range(len(source))])


def oracle(config, wrong=()):
    """A predict_fn that knows each image's label (found by its pixels) and is right except on ``wrong`` labels."""
    labels_by_image = {}
    for b in pipeline.eval_dataset(config, batch_size=BATCH):
        for image, label, real in zip(b["images"], b["labels"], b["mask"], strict=True):
            if real:
                labels_by_image[image.tobytes()] = int(label)

    def predict(images):
        labels = np.array([labels_by_image[image.tobytes()] for image in np.asarray(images)])
        return one_hot_logits(np.where(np.isin(labels, wrong), (labels + 1) % NUM_CLASSES, labels))

    return predict


def test_evaluate_split_on_mock_imagenet_a_ignores_padding_and_applies_the_mask(mock_tfds):
    config = robustness.with_dataset(base_config(), "imagenet_a")
    assert (config.name, config.eval_split, config.image_size) == ("imagenet_a", "test", 16)
    labels = true_labels("imagenet_a", "test")
    assert len(labels) == NUM_EXAMPLES
    # Wrong on example 0's label: its 3 padding copies would add 3 wrong rows if they counted.
    result = robustness.evaluate_split(oracle(config, wrong=[labels[0]]), config, batch_size=BATCH)
    expected = int(np.sum(labels != labels[0]))
    assert result == {"accuracy": expected / 5, "error": 1 - expected / 5, "correct": expected, "count": 5}
    # With the 200-class mask, a label outside the subset can never be predicted.
    subset = robustness.IMAGENET_A_CLASSES
    masked = robustness.evaluate_split(oracle(config), config, batch_size=BATCH, class_subset=subset)
    inside = int(np.isin(labels, subset).sum())
    assert masked["correct"] == inside and masked["labels_outside_subset"] == 5 - inside and masked["count"] == 5


def test_evaluate_imagenet_c_on_mock_data_gives_15_ces(mock_tfds):
    config = base_config()
    constant = 3  # predicts class 3 everywhere
    predict = lambda images: one_hot_logits([constant] * len(images))  # noqa: E731
    result = robustness.evaluate_imagenet_c(predict, config, batch_size=BATCH)
    assert len(result["per_config"]) == 75 and len(result["ce"]) == 15
    # The mock serves the same 224x224 examples for every configuration.
    error = float(np.mean(true_labels("imagenet2012_corrupted/fog_1", "validation") != constant))
    for corruption, ce in result["ce"].items():
        assert ce == pytest.approx(error / robustness.ALEXNET_ERRORS[corruption])
    assert result["mce"] == pytest.approx(np.mean(list(result["ce"].values())))
    assert result["mean_error"] == pytest.approx(error)
    assert all(r["count"] == NUM_EXAMPLES for r in result["per_config"].values())
    table = robustness.format_table({"imagenet2012_corrupted:validation": result}).splitlines()
    assert len(table) == 1 + 15 + 1 and "mCE" in table[-1] and f"{100 * result['mce']:.1f}%" in table[-1]
    # A subset of severities: errors only.
    few = robustness.evaluate_imagenet_c(predict, config, batch_size=BATCH, corruptions=["fog"], severities=[1, 2])
    assert set(few["per_config"]) == {"fog_1", "fog_2"} and few["ce"] == {} and few["mce"] is None


def test_imagenet_c_configs_keep_the_transform_but_skip_the_crop():
    config = robustness.with_dataset(base_config(), "imagenet2012_corrupted/fog_1", data_dir="/data/tfds")
    assert config.eval_crop_pct == 1.0 and config.image_size == 16 and config.data_dir == "/data/tfds"
    assert config.eval_split == "validation" and config.mean == schema.IMAGENET_MEAN
    assert robustness.with_dataset(base_config(), "imagenet_r").eval_crop_pct == 0.875


def test_cli_writes_json_and_a_table(mock_tfds, monkeypatch, tmp_path, capsys):
    calls = []

    def load_classifier(workdir):
        calls.append(workdir)
        return (lambda images: one_hot_logits([robustness.IMAGENET_R_CLASSES[0]] * len(images))), base_config()

    monkeypatch.setattr(robustness_tool, "load_classifier", load_classifier)
    monkeypatch.setattr(distributed, "initialize_distributed", lambda *args: None)
    out = tmp_path / "results.json"
    argv = ["--workdir", str(tmp_path), "--datasets", "imagenet_a,imagenet_r:test,imagenet_v2", "--out", str(out)]
    robustness_tool.main([*argv, "--batch_size", str(BATCH)])
    results = json.loads(pathlib.Path(out).read_text())
    assert calls == [str(tmp_path)]
    assert set(results) == {"imagenet_a:test", "imagenet_r:test", "imagenet_v2:test"}
    assert all(r["count"] == NUM_EXAMPLES for r in results.values())
    assert (
        "labels_outside_subset" in results["imagenet_r:test"]
        and "labels_outside_subset" not in results["imagenet_v2:test"]
    )
    table = capsys.readouterr().out
    assert "imagenet_r:test" in table and "top-1 acc" in table


def test_cli_evaluates_a_fine_tuned_checkpoint_on_mock_imagenet_a(mock_tfds, tmp_path):
    # A real fine-tuning run (two steps of a tiny 1000-class classifier on Fashion-MNIST) read back by
    # tools.robustness.load_classifier: the whole path a user takes, on mock ImageNet-A.
    from test_finetune import tiny_finetune_config

    from prmim_jax import train
    from prmim_jax.evaluate import eval_config

    config = tiny_finetune_config(total_steps=2, batch_size=8)
    config.model.num_classes = 1000
    config.evals.accuracy.batch_size = 8
    # The same evaluation as an evaluator of the run (config.evals), at its end.
    config.evals.robustness = eval_config("robustness", datasets="imagenet_a", batch_size=8)
    final = train.train_and_evaluate(config, str(tmp_path / "ft"))
    out = tmp_path / "robustness.json"
    robustness_tool.main(
        ["--workdir", str(tmp_path / "ft"), "--datasets", "imagenet_a", "--batch_size", "8", "--out", str(out)]
    )
    result = json.loads(out.read_text())["imagenet_a:test"]
    assert result["count"] == NUM_EXAMPLES and 0.0 <= result["accuracy"] <= 1.0
    assert final["imagenet_a:test/accuracy"] == result["accuracy"]
    predict, data = robustness_tool.load_classifier(tmp_path / "ft")
    batch = next(iter(pipeline.eval_dataset(robustness.with_dataset(data, "imagenet_a"), batch_size=8)))
    predicted = robustness.predictions(predict(batch["images"]), robustness.IMAGENET_A_CLASSES)
    assert set(predicted.tolist()) <= set(robustness.IMAGENET_A_CLASSES)
    expected = np.mean((predicted == batch["labels"])[batch["mask"]])
    assert result["accuracy"] == pytest.approx(expected)
