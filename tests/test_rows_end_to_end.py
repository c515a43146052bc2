"""Each framework's row of the paper runs end to end in its ``runlocal`` form, by the commands
``python -m configs.rows <row> --runlocal`` prints: pretraining (TEC's after its teacher), then the fine-tuning of
the pretrained encoder with the framework's own recipe. One row per framework keeps the suite short; every row's
configs are built in ``test_recipes``."""

import importlib
import shlex
import shutil

import jax
import numpy as np
import pytest

from configs import rows
from prmim_jax import methods, runs, train

# One row per framework: its PR-MIM row, and AMT's on SimMIM (absolute table, cls readout in fine-tuning).
ROWS = (
    "table2/prmim-50",
    "table4/simmim-prmim-30-e100",
    "table4/localmim-prmim-65",
    "table4/mff-prmim-50",
    "table4/tec-prmim-50",
    "table5/greenmim-prmim-50-swin-b",
    "table6/simmim-amt",
)


def parsed(command: str) -> tuple[str, str, dict[str, str]]:
    """``(config spec, workdir, {dotted key: value})`` of a ``python -m prmim_jax.main`` command line."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:3] == ["python", "-m", "prmim_jax.main"], command
    flags = dict(word.removeprefix("--").split("=", 1) if "=" in word else (word, None) for word in words[3:])
    spec = words[words.index("--config") + 1].removeprefix("configs/")
    workdir = words[words.index("--workdir") + 1]
    overrides = {key.removeprefix("config."): value for key, value in flags.items() if key.startswith("config.")}
    return spec, workdir, overrides


def config_of(spec: str, overrides: dict[str, str]):
    file, _, arg = spec.partition(":")
    config = importlib.import_module("configs." + file.removesuffix(".py")).get_config(arg or None)
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[key] = value
    return config


def by_path(tree) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf, np.float32) for path, leaf in jax.tree.leaves_with_path(tree)}


@pytest.mark.parametrize("row_id", ROWS)
def test_row_pretrains_and_fine_tunes_end_to_end_with_its_recipe(row_id, tmp_path):
    row = rows.row(row_id)
    results = []
    for command in rows.commands(row, workdirs=str(tmp_path), runlocal=True):
        spec, workdir, overrides = parsed(command)
        config = config_of(spec, overrides)
        results.append((config, train.train_and_evaluate(config_of(spec, overrides), workdir), workdir))
    (pretrain_config, pretrained, pretrain_dir), (finetune_config, finetuned, finetune_dir) = results[-2:]
    assert pretrained["step"] == pretrain_config.total_steps and np.isfinite(pretrained["loss"])
    assert 0.0 <= pretrained["knn_accuracy"] <= 1.0
    assert finetuned["step"] == finetune_config.total_steps and 0.0 <= finetuned["accuracy"] <= 1.0
    # The fine-tuning started from the pretrained encoder: a block the classifier shares with it moved from the
    # pretrained values by its few steps only, not from a fresh initialisation.
    _, method, pretrained_variables, _ = runs.load(pretrain_dir)
    _, _, finetuned_variables, _ = runs.load(finetune_dir)
    _, encoder = method.encoder(pretrained_variables.params)
    start, end = by_path(encoder), by_path(finetuned_variables.params["encoder"])
    shared = [path for path in start if path in end and start[path].shape == end[path].shape]
    moved = max(float(np.abs(start[path] - end[path]).max()) for path in shared)
    assert len(shared) >= len(start) // 2 and moved < 0.5, (
        f"{row_id}: the fine-tuning did not start from the pretraining"
    )
    if row_id == ROWS[0]:  # a finished fine-tuning loads without the pretraining it started from
        shutil.rmtree(pretrain_dir)
        assert runs.load(finetune_dir).step == finetune_config.total_steps
    if row_id == "table4/simmim-prmim-30-e100":  # another encoder's recipe stops before compiling, naming the right one
        wrong = config_of("finetune_in1k.py:runlocal", {"init.workdir": pretrain_dir})
        with pytest.raises(ValueError, match=r"simmim_vit encoder .* configs/finetune_simmim_in1k\.py"):
            methods.build(wrong)
    if row.finetune.startswith("finetune_simmim_in1k.py") and "recipe=amt" not in row.finetune:
        # SimMIM's fine-tuning: a relative table per block, each started from the pretrained shared one.
        blocks = finetuned_variables.params["encoder"]["transformer"]
        assert all("relative_position_bias" in blocks[f"block_{i}"] for i in range(finetune_config.model.depth))
