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
from prmim_jax.methods import classify

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
        results.append(
            (config_of(spec, overrides), train.train_and_evaluate(config_of(spec, overrides), workdir), workdir)
        )
    (pretrain_config, pretrained, pretrain_dir), (finetune_config, finetuned, finetune_dir) = results[-2:]
    assert pretrained["step"] == pretrain_config.total_steps and np.isfinite(pretrained["loss"])
    assert 0.0 <= pretrained["knn_accuracy"] <= 1.0
    assert finetuned["step"] == finetune_config.total_steps and 0.0 <= finetuned["accuracy"] <= 1.0
    _, method, pretrained_variables, _ = runs.load(pretrain_dir)
    if pretrain_config.method.get("reconstruction") == "progressive":  # PR-MIM trained its aggregator
        assert any("aggregat" in path for path in by_path(pretrained_variables.params)), row_id
    if any(key.startswith("fusion_weight_") for key in pretrained):  # MFF: a softmax over the fused levels
        assert sum(v for k, v in pretrained.items() if k.startswith("fusion_weight_")) == pytest.approx(1.0)
    if row.teacher:  # TEC: two targets; the teacher is its run's encoder, untouched by the student's training
        assert pretrained["loss"] == pytest.approx(pretrained["feature_loss"] + pretrained["attention_loss"], rel=1e-5)
        teacher = by_path(runs.load(tmp_path / "teacher").variables.params["encoder"]["transformer"])
        frozen = by_path(pretrained_variables.frozen["teacher"]["transformer"])
        assert frozen.keys() == teacher.keys()
        for path, leaf in teacher.items():
            np.testing.assert_array_equal(frozen[path], leaf, err_msg=path)
    # The fine-tuning starts from the pretrained encoder: every parameter the classifier's encoder shares with it
    # is the pretrained one (SimMIM's per-block tables start from the shared one), and its steps moved them.
    _, encoder = method.encoder(pretrained_variables.params)
    pretrained_encoder = by_path(encoder)
    finetune_method = methods.build(finetune_config)
    start = by_path(classify.pretrained_encoder(finetune_method.config, finetune_method.model.encoder, runs.load))
    end = by_path(runs.load(finetune_dir).variables.params["encoder"])
    kept = [path for path in end if path in start]
    assert len(kept) >= len(end) // 2 and any(not np.array_equal(start[path], end[path]) for path in kept), row_id
    for path in set(kept) & set(pretrained_encoder):
        np.testing.assert_array_equal(start[path], pretrained_encoder[path], err_msg=f"{row_id}: {path}")
    if row_id == ROWS[0]:  # a finished fine-tuning loads without the pretraining it started from
        shutil.rmtree(pretrain_dir)
        assert runs.load(finetune_dir).step == finetune_config.total_steps
    if row_id == "table4/simmim-prmim-30-e100":  # another encoder's recipe stops before compiling, naming the right one
        wrong = config_of("finetune_in1k.py:runlocal", {"init.workdir": pretrain_dir})
        with pytest.raises(ValueError, match=r"simmim_vit encoder .* configs/finetune_simmim_in1k\.py"):
            methods.build(wrong)
    if row.finetune.startswith("finetune_simmim_in1k.py") and "recipe=amt" not in row.finetune:
        # SimMIM's fine-tuning: a relative table per block, each started from the pretrained shared one.
        shared_table = pretrained_encoder["['relative_position_bias']"]
        for i in range(finetune_config.model.depth):
            np.testing.assert_array_equal(
                start[f"['transformer']['block_{i}']['relative_position_bias']"], shared_table
            )
