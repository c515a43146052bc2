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
