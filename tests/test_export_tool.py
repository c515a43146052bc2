"""``python -m prmim_jax.export``: one command from a run to each downstream format, and one-line errors.

One tiny MAE-family run (the commands of docs/downstream.md ran on it); the other families reach the
same code through ``Method.encoder`` (every fmnist config's method is checked to give an encoder that
``interop.export`` takes) and through a stand-in loader where a bad input needs another encoder.
"""

import pathlib
import types

import jax
import numpy as np
import pytest
import torch
import transformers
from test_export import ATOL, from_pretrained, nchw, swin_encoder  # noqa: F401  (swin_encoder: a fixture)
from test_train import tiny_config

from prmim_jax import methods, runs, train
from prmim_jax.interop import export
from prmim_jax.methods import Variables
from prmim_jax.tools import export as tool

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A PR-MIM run of two steps on Fashion-MNIST (28 x 28, patch 4), checkpoints at steps 1 and 2."""
    workdir = tmp_path_factory.mktemp("run")
    train.train_and_evaluate(tiny_config(total_steps=2, checkpoint_every=1), str(workdir))
    return workdir


def export_cli(*args: str) -> None:
    tool.main([str(a) for a in args])


def stopped_with(capsys, *args: str) -> str:
    """The one line the tool stops with."""
    with pytest.raises(SystemExit) as stop:
        export_cli(*args)
    message = str(stop.value.code)
    assert message.startswith("export: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "fmt, out",
    [
        ("mae", "mae.pth"),
        ("timm", "timm.safetensors"),
        ("mmseg", "mmseg.pth"),
        ("mmdet", "mmdet.pth"),
        ("transformers", "hf"),
    ],
)
def test_a_run_exports_to_each_format_with_one_command(tmp_path, run_dir, fmt, out):
    export_cli("--workdir", run_dir, "--to", fmt, "--out", tmp_path / out)
    assert (tmp_path / out).exists() and not list(tmp_path.glob("*.partial"))


def test_the_transformers_export_of_a_run_computes_the_run_encoders_features(tmp_path, run_dir):
    export_cli("--workdir", run_dir, "--to", "transformers", "--out", tmp_path / "hf")
    _, method, variables, _ = runs.load(run_dir)
    encoder, params = method.encoder(variables.params)
    model = from_pretrained(transformers.ViTModel, str(tmp_path / "hf"), add_pooling_layer=False)
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    with torch.no_grad(), jax.default_matmul_precision("highest"):
        theirs = model(pixel_values=nchw(x)).last_hidden_state.numpy()
        np.testing.assert_allclose(theirs, np.asarray(encoder.apply({"params": params}, x)), atol=ATOL)


def test_image_size_resizes_the_position_table_as_fine_tuning_does(tmp_path, run_dir):
    import timm  # installed by launch/setup_env.sh --test

    export_cli("--workdir", run_dir, "--step", 1, "--to", "timm", "--out", tmp_path / "vit56.pth", "--image_size", 56)
    _, method, variables, _ = runs.load(run_dir, 1)
    encoder, params = tool.at_image_size(*method.encoder(variables.params), 56)
    assert params["pos_embedding"].shape == (1 + 14 * 14, 32)
    model = timm.models.VisionTransformer(
        img_size=56, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=4, num_classes=0, global_pool="token"
    )
    model.load_state_dict(torch.load(tmp_path / "vit56.pth", weights_only=True)["model"], strict=True)
    x = np.random.default_rng(0).normal(size=(2, 56, 56, 1)).astype(np.float32)
    with torch.no_grad(), jax.default_matmul_precision("highest"):
        theirs = model.eval().forward_features(nchw(x)).numpy()
        np.testing.assert_allclose(theirs, np.asarray(encoder.apply({"params": params}, x)), atol=ATOL)


def test_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    message = stopped_with(capsys, "--workdir", tmp_path, "--to", "mae", "--out", tmp_path / "x.pth")
    assert "is not a run" in message and "--workdir" in message
    assert not (tmp_path / "x.pth").exists()


def test_a_step_the_run_does_not_have_is_refused_naming_its_steps(tmp_path, run_dir, capsys):
    message = stopped_with(capsys, "--workdir", run_dir, "--step", 7, "--to", "mae", "--out", tmp_path / "x.pth")
    assert "no step 7" in message and "[1, 2]" in message and "leave --step out" in message
    assert not (tmp_path / "x.pth").exists()


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, run_dir, capsys):
    out = tmp_path / "mae.pth"
    out.write_bytes(b"precious")
    message = stopped_with(capsys, "--workdir", run_dir, "--to", "mae", "--out", out)
    assert "exists" in message and "--overwrite" in message and out.read_bytes() == b"precious"
    export_cli("--workdir", run_dir, "--to", "mae", "--out", out, "--overwrite")
    assert "cls_token" in torch.load(out, weights_only=True)["model"]


@pytest.mark.parametrize(
    "fmt, out, words",
    [("onnx", "x.pth", "choose one of"), ("mmseg", "x.safetensors", ".pth"), ("transformers", "x.pth", "folder")],
)
def test_a_format_or_output_that_does_not_fit_is_refused_before_reading_the_run(tmp_path, capsys, fmt, out, words):
    message = stopped_with(capsys, "--workdir", tmp_path / "none", "--to", fmt, "--out", tmp_path / out)
    assert words in message


def test_a_swin_to_mae_is_refused_naming_the_formats_it_takes(tmp_path, swin_encoder):  # noqa: F811
    module, params = swin_encoder
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    greenmim_like = types.SimpleNamespace(encoder=lambda p: (module, p), predict_fns=dict)
    args = tool.parse(["--workdir", str(tmp_path / "run"), "--to", "mae", "--out", str(tmp_path / "x.pth")])
    with pytest.raises(export.ExportError, match="a Swin has no official MAE layout; use --to timm"):
        tool.run(args, load_run=lambda *_: (None, greenmim_like, Variables(params), 5))
    assert not (tmp_path / "x.pth").exists()


def test_a_classifier_run_exports_its_head_and_batchnorm_statistics():
    head = {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}
    stats = {"head_norm": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}}
    variables = Variables({"encoder": {"w": 1}, "head": head}, batch_stats=stats)
    classifier_like = types.SimpleNamespace(
        encoder=lambda p: ("module", p["encoder"]), predict_fns=lambda: {"logits": lambda *_: None}
    )
    _, params, exported_head = tool.encoder_and_head(classifier_like, variables)
    assert params == {"w": 1} and exported_head == {"head": head, "head_norm": stats["head_norm"]}


FMNIST_CONFIGS = sorted((ROOT / "configs").glob("*_fmnist.py"))


@pytest.mark.parametrize("path", FMNIST_CONFIGS, ids=lambda p: p.stem)
def test_every_methods_encoder_is_one_the_exporter_takes(path):
    from test_configs import load

    config = load(path).get_config()
    config.method.update(methods.registration(config.method.name).placeholders)  # TEC's teacher: read at start
    method = methods.build(config)
    encoder, _ = method.encoder()
    kind = export.family(encoder)
    expected = {
        "vit": export.FORMATS,
        "simmim_vit": ("timm", "transformers", "mmseg"),
        "swin": ("timm", "transformers", "mmseg", "mmdet"),
    }
    for fmt in expected[kind]:
        export.check(encoder, fmt)
