"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_model_example_runs():
    block = next(b for b in python_blocks() if "build_mae" in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].pred_decoded.shape == (2, 147, 768)
    assert float(namespace["loss"]) > 0


def test_readme_methods_example_runs():
    block = next(b for b in python_blocks() if "methods.build(config)" in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    batch = namespace["batch"]
    assert batch["images"].shape == (2, 224, 224, 3)
    assert batch["ids_thrown"].shape == (2, 98) and batch["ids_decoded"].shape == (2, 49)
    assert namespace["method"].throwing.progressive
