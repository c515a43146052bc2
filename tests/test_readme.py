"""The Python examples of the README and of docs/python_api.md run as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parent.parent
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "python_api.md")


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


BLOCKS = [(path, block) for path in DOCUMENTS for block in python_blocks(path)]


def check_model(namespace):
    assert namespace["out"].pred_decoded.shape == (2, 147, 768)
    assert float(namespace["loss"]) > 0


def check_method(namespace):
    assert namespace["method"].throwing.progressive
    if "batch" in namespace:
        batch = namespace["batch"]
        assert batch["images"].shape == (2, 224, 224, 3)
        assert batch["ids_thrown"].shape == (2, 98) and batch["ids_decoded"].shape == (2, 49)


def check_mae_checkpoint(namespace):
    assert set(namespace["imported"]) == {"encoder"}  # the encoder-only file
    assert {"encoder", "decoder"} <= set(namespace["params"])
    assert pathlib.Path("encoder.pth").is_file() and pathlib.Path("ours.safetensors").is_file()


def check_swin(namespace):
    out = namespace["out"]
    assert out.features.shape == (2, 7, 7, 64) and out.pooled.shape == (2, 64)
    assert out.logits.shape == (2, 1000) and str(out.logits.dtype) == "float32"


# What identifies an example -> what it must leave behind.
CHECKS = {
    "mae.reconstruction_loss(": check_model,
    "methods.build(": check_method,
    "mae_checkpoint.merge_into(": check_mae_checkpoint,
    "swin_checkpoint.load(": check_swin,
}


def test_every_kind_of_example_is_there():
    for marker in CHECKS:
        assert any(marker in block for _, block in BLOCKS), marker


@pytest.mark.parametrize("path, block", BLOCKS, ids=[f"{path.name}:{i}" for i, (path, _) in enumerate(BLOCKS)])
def test_example_runs(path, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write their files here
    namespace = {}
    exec(compile(block, str(path.relative_to(ROOT)), "exec"), namespace)
    for marker, check in CHECKS.items():
        if marker in block:
            check(namespace)
