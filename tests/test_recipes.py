"""Every experiment config follows the recipe table (``configs/recipes.py``), and every row of the paper's tables
(``configs/rows.py``) names configs that build: a silent drift from an official recipe fails here."""

import importlib
import math
import pathlib

import pytest

from configs import recipes, rows

ROOT = pathlib.Path(__file__).parent.parent


def build(spec: str):
    """The config of ``<file>:<argument>``."""
    file, _, arg = spec.partition(":")
    return importlib.import_module("configs." + file.removesuffix(".py")).get_config(arg or None)


def lookup(config, dotted: str):
    for key in dotted.split("."):
        assert key in config, f"the config has no {dotted!r} (at {key!r})"
        config = config[key]
    return config


def resolved(value, steps_per_epoch: int):
    """``value`` with every ``recipes.Epochs`` as the step count it stands for."""
    if isinstance(value, recipes.Epochs):
        return round(value.epochs * steps_per_epoch)
    if isinstance(value, (tuple, list)):
        return tuple(resolved(v, steps_per_epoch) for v in value)
    return value


def same(got, expected) -> bool:
    if isinstance(expected, tuple):
        return isinstance(got, (tuple, list)) and len(got) == len(expected) and all(map(same, got, expected))
    if isinstance(expected, float) and not isinstance(got, bool) and isinstance(got, (int, float)):
        return math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12)
    return type(got) is type(expected) and got == expected


@pytest.mark.parametrize("recipe", recipes.RECIPES, ids=lambda r: r.config)
def test_config_holds_every_value_of_its_recipe(recipe):
    config = build(recipe.config)
    steps_per_epoch = recipe.train_images // config.batch_size
    for setting in recipe.settings:
        if setting.key == recipes.NOT_IN_CONFIG:
            continue
        keys = setting.key.split(",")
        got = tuple(lookup(config, key) for key in keys) if len(keys) > 1 else lookup(config, keys[0])
        expected = resolved(setting.value, steps_per_epoch)
        assert same(got, expected), (
            f"{recipe.config}: {setting.name} ({setting.key}) is {got!r}, the recipe {expected!r}"
        )


def test_every_imagenet_and_inaturalist_config_has_a_recipe():
    covered = {recipe.config.partition(":")[0] for recipe in recipes.RECIPES}
    files = {p.name for p in (ROOT / "configs").glob("*.py") if p.stem.endswith(("_in1k", "_inat"))}
    assert files and files <= covered, f"configs without a recipe in configs/recipes.py: {sorted(files - covered)}"


def test_every_setting_names_the_file_it_was_read_from():
    for recipe in recipes.RECIPES:
        for setting in recipe.settings:
            assert setting.source.startswith((*recipes.REPOSITORIES, recipes.PRMIM)), (recipe.title, setting.name)
            assert setting.official and setting.key, (recipe.title, setting.name)


def test_docs_recipes_md_is_the_tables_as_generated():
    # docs/recipes.md is written by `python -m configs.rows --markdown > docs/recipes.md`
    assert (ROOT / "docs" / "recipes.md").read_text() == rows.markdown()


def test_every_row_names_configs_that_build_and_its_pretraining():
    specs = set()
    for row in rows.ROWS:
        source = rows.pretraining_of(row)
        assert source.pretrain, f"{row.id} fine-tunes {row.from_row}, which has no pretraining"
        specs |= {source.pretrain, row.finetune}
    for spec in sorted(specs):
        for arg in ("", "runlocal"):
            file, _, given = spec.partition(":")
            config = build(f"{file}:{','.join(a for a in (given, arg) if a)}")
            assert config.total_steps > 0, spec


def test_tables_2_to_6_have_every_row_of_the_paper():
    counts = {table: sum(row.table == table for row in rows.ROWS) for table in ("table2", "table3", "table4", "table5")}
    # Table 2: the baseline and 4 designs x 3 ratios; Table 3: 11 rows beyond Table 2's 100-epoch ViT-B ones;
    # Table 4: 14 rows; Table 5: 6 rows.
    assert counts == {"table2": 13, "table3": 11, "table4": 14, "table5": 6}
    assert {row.id for row in rows.ROWS if row.table == "table6"} >= {"table6/mae-amt", "table6/simmim-amt"}


def test_a_row_that_does_not_exist_is_refused_naming_the_closest(capsys):
    assert rows.main(["table4/tec-prmim"]) == 2
    assert "Did you mean 'table4/tec-prmim-50'?" in capsys.readouterr().err
    assert rows.main(["table9/mae"]) == 2
    assert "Tables 9 and 10 (ADE20K, COCO) run in the downstream tools" in capsys.readouterr().err


def test_a_row_prints_its_two_commands_and_the_papers_number(capsys):
    assert rows.main(["table2/prmim-50"]) == 0
    out = capsys.readouterr().out
    assert (
        "--config configs/pretrain_in1k.py:method=prmim,sampler=furthest,throw=0.5 --workdir workdirs/table2_prmim-50"
        in out
    )
    assert "--config configs/finetune_in1k.py --workdir workdirs/table2_prmim-50_ft" in out
    assert "--config.init.workdir=workdirs/table2_prmim-50" in out and "the paper: 81.8 (top-1)" in out
