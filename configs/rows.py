"""The paper's experiments, row by row: for each, the pretraining and the fine-tuning (configs and arguments) and
the number the paper reports.

    python -m configs.rows                       # every row: id, the paper's number
    python -m configs.rows table2/prmim-50       # its two commands and the number they should reach
    python -m configs.rows table4/tec-prmim-50 --runlocal   # the same commands, seconds on Fashion-MNIST
    python -m configs.rows --markdown            # docs/recipes.md (the recipe table, then the rows)

A row's ``runlocal`` form appends ``runlocal`` to both config arguments: the same code on Fashion-MNIST-sized
data with a tiny model (``common.run_locally``). Numbers are ImageNet-1K top-1 after fine-tuning unless the row
says otherwise; ``None`` marks a row the paper does not report (an option of ours beside the paper's).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from configs import recipes
from prmim_jax import config_args


@dataclasses.dataclass(frozen=True)
class Row:
    """One experiment: ``pretrain`` and ``finetune`` as ``<config file>:<argument>`` (``pretrain`` None: the row
    evaluates another row's pretraining, ``from_row``), what the paper reports (``paper``, its ``metric``)."""

    id: str
    description: str
    pretrain: str | None
    finetune: str
    paper: str | None
    metric: str = "top-1"
    from_row: str | None = None
    teacher: bool = False  # TEC: the pretraining distils a teacher the user supplies

    @property
    def table(self) -> str:
        return self.id.partition("/")[0]


def _with(spec: str, *extra: str) -> str:
    """``spec`` with ``extra`` items appended to its argument."""
    file, _, arg = spec.partition(":")
    items = [item for item in (arg, *extra) if item]
    return f"{file}:{','.join(items)}" if items else file


def _mae_rows() -> list[Row]:
    rows = [Row("table2/mae", "MAE, ViT-B/16, 100 epochs", "pretrain_in1k.py:method=mae", "finetune_in1k.py", "81.7")]
    # Table 2: (progressive, furthest) x rho_d; the paper's Top-1.
    table2 = {
        25: {(0, 0): "81.4", (1, 0): "81.7", (0, 1): "81.6", (1, 1): "81.7"},
        50: {(0, 0): "81.1", (1, 0): "81.6", (0, 1): "81.4", (1, 1): "81.8"},
        65: {(0, 0): "80.3", (1, 0): "81.5", (0, 1): "80.4", (1, 1): "81.7"},
    }
    names = {(0, 0): "partial", (1, 0): "progressive-random", (0, 1): "partial-furthest", (1, 1): "prmim"}
    for rho, numbers in table2.items():
        for (progressive, furthest), number in numbers.items():
            method = "prmim" if progressive else "partial"
            sampler = "furthest" if furthest else "random_throw"
            rows.append(
                Row(
                    f"table2/{names[progressive, furthest]}-{rho}",
                    f"MAE + {'progressive' if progressive else 'partial'} reconstruction, {sampler} sampler, "
                    f"rho_d {rho / 100:g}, 100 epochs",
                    f"pretrain_in1k.py:method={method},sampler={sampler},throw={rho / 100:g}",
                    "finetune_in1k.py",
                    number,
                )
            )
    # Table 3: schedules and ViT-L.
    for model, epochs, numbers in (
        ("B/16", 300, ("82.7", "82.3", "82.7")),
        ("B/16", 800, ("83.3", "83.0", "83.3")),
        ("L/16", 100, ("83.3", "82.4", "83.2")),
        ("L/16", 800, ("85.4", None, "85.4")),
    ):
        size = "" if model == "B/16" else f"model={model}"
        tag = f"{'b' if model == 'B/16' else 'l'}16-e{epochs}"
        finetune = "finetune_in1k.py" + ("" if model == "B/16" else f":model={model}")
        for name, method, label, number in zip(
            ("mae", "partial-50", "prmim-50"),
            ("method=mae", "method=partial,sampler=random_throw,throw=0.5", "method=prmim"),
            ("MAE", "MAE + partial reconstruction (random, rho_d 0.5)", "MAE + PR-MIM (rho_d 0.5)"),
            numbers,
            strict=True,
        ):
            if number is None:
                continue
            rows.append(
                Row(
                    f"table3/{name}-{tag}",
                    f"{label}, ViT-{model}, {epochs} epochs",
                    _with("pretrain_in1k.py", method, f"epochs={epochs}", size),
                    finetune,
                    number,
                )
            )
    # Tables 11 and 12: the aggregator.
    for kernel, number in ((3, "81.7"), (5, "81.7"), (7, "81.8"), (9, "81.7"), (11, "81.6")):
        rows.append(
            Row(
                f"table11/kernel-{kernel}",
                f"PR-MIM with a {kernel}x{kernel} depth-wise aggregator",
                f"pretrain_in1k.py:kernel={kernel}",
                "finetune_in1k.py",
                number,
            )
        )
    for aggregator, number in (("avgpool", "fails"), ("dwconv", "81.8"), ("transformer", "81.8"), ("convnext", "81.7")):
        rows.append(
            Row(
                f"table12/{aggregator}",
                f"PR-MIM with the {aggregator} aggregator",
                f"pretrain_in1k.py:aggregator={aggregator}",
                "finetune_in1k.py",
                number,
            )
        )
    return rows


TITLES = {"simmim": "SimMIM", "localmim": "LocalMIM", "mff": "MFF", "tec": "TEC"}
# What a row adds to its framework, by reconstruction.
ADDED = {
    "full": "",
    "partial": " + partial reconstruction (random, rho_d {rho:g})",
    "progressive": " + PR-MIM (rho_d {rho:g})",
}


def _framework_rows() -> list[Row]:
    """Tables 4 and 5: each framework's baseline, + partial reconstruction, + PR-MIM."""
    rows = []
    for framework, pretrain, finetune, epochs, rho, numbers in (
        ("simmim", "pretrain_simmim_in1k.py:epochs=100", "finetune_simmim_in1k.py", 100, 0.3, ("81.6", "81.0", "81.7")),
        ("simmim", "pretrain_simmim_in1k.py", "finetune_simmim_in1k.py", 800, 0.3, ("83.8", None, "83.8")),
        (
            "localmim",
            "pretrain_localmim_in1k.py",
            "finetune_in1k.py:framework=localmim",
            100,
            0.65,
            ("83.3", "82.9", "83.3"),
        ),
        ("mff", "pretrain_mff_in1k.py", "finetune_in1k.py:framework=mff", 800, 0.5, ("83.6", "83.3", "83.8")),
        ("tec", "pretrain_tec_in1k.py", "finetune_in1k.py:framework=tec", 300, 0.5, ("84.8", "84.5", "84.7")),
    ):
        tag = f"-e{epochs}" if framework == "simmim" else ""
        for name, reconstruction, number in zip(
            ("", "-partial", "-prmim"), ("full", "partial", "progressive"), numbers, strict=True
        ):
            if number is None:
                continue
            throwing = () if reconstruction == "full" else (f"reconstruction={reconstruction}", f"throw={rho:g}")
            sampler = ("sampler=random_throw",) if reconstruction == "partial" else ()
            suffix = "" if not name else f"{name}-{round(rho * 100)}"
            rows.append(
                Row(
                    f"table4/{framework}{suffix}{tag}",
                    f"{TITLES[framework]}{ADDED[reconstruction].format(rho=rho)}, ViT-B/16, {epochs} epochs",
                    _with(pretrain, *throwing, *sampler),
                    finetune,
                    number,
                    teacher=framework == "tec",
                )
            )
    for model, numbers in (("B", ("83.2", "82.9", "83.3")), ("L", ("83.8", "83.1", "83.9"))):
        size = "" if model == "B" else "model=L"
        for name, reconstruction, number in zip(
            ("", "-partial", "-prmim"), ("full", "partial", "progressive"), numbers, strict=True
        ):
            throwing = () if reconstruction == "full" else (f"reconstruction={reconstruction}", "throw=0.5")
            sampler = ("sampler=random_throw",) if reconstruction == "partial" else ()
            rows.append(
                Row(
                    f"table5/greenmim{name}{'-50' if name else ''}-swin-{model.lower()}",
                    f"GreenMIM{ADDED[reconstruction].format(rho=0.5)}, Swin-{model}, 100 epochs",
                    _with("pretrain_greenmim_in1k.py", size, *throwing, *sampler),
                    _with("finetune_swin_in1k.py", size),
                    number,
                )
            )
    return rows


def _table6_rows() -> list[Row]:
    return [
        Row(
            "table6/mae-partial-40-e400",
            "MAE + partial reconstruction (random, rho_d 0.4), 400 epochs (the paper borrows it from AMT's paper)",
            "pretrain_in1k.py:method=partial,sampler=random_throw,throw=0.4,epochs=400",
            "finetune_in1k.py",
            "82.6",
        ),
        Row(
            "table6/mae-amt", "MAE + AMT, 400 epochs", "pretrain_amt_in1k.py", "finetune_in1k.py:framework=amt", "82.8"
        ),
        Row(
            "table6/mae-prmim-50-e400",
            "MAE + PR-MIM, 400 epochs",
            "pretrain_in1k.py:epochs=400",
            "finetune_in1k.py",
            "83.0",
        ),
        Row(
            "table6/simmim-partial-24",
            "SimMIM + partial reconstruction (random, rho_d 0.24), 100 epochs",
            "pretrain_simmim_in1k.py:epochs=100,reconstruction=partial,sampler=random_throw,throw=0.24",
            "finetune_simmim_in1k.py",
            "81.6",
        ),
        Row(
            "table6/simmim-amt",
            "SimMIM + AMT, 200 epochs",
            "pretrain_amt_in1k.py:framework=simmim",
            "finetune_simmim_in1k.py:recipe=amt",
            "80.7",
        ),
        Row(
            "table6/simmim-prmim-30",
            "SimMIM + PR-MIM, 100 epochs",
            "pretrain_simmim_in1k.py:epochs=100,reconstruction=progressive,throw=0.3",
            "finetune_simmim_in1k.py",
            "81.7",
        ),
        Row(
            "table6/mae-running-cell-50",
            "MAE + partial reconstruction with VideoMAE V2's running cell (rho_d 0.5), 100 epochs",
            "pretrain_in1k.py:method=partial,sampler=running_cell,throw=0.5",
            "finetune_in1k.py",
            None,
        ),
        Row(
            "table6/mae-running-cell-50-videomae",
            "MAE + partial reconstruction with VideoMAE V2's running cell as VideoMAE V2 decodes it (mask tokens at "
            "every cell-kept position, visible ones included; loss on the masked ones), rho_d 0.5, 100 epochs",
            "pretrain_in1k.py:method=partial,sampler=running_cell,throw=0.5,running_cell_decoder=videomae",
            "finetune_in1k.py",
            None,
        ),
    ]


# TFDS has iNaturalist 2018; 2019 is read from a folder of the user's (configs/finetune_inat.py).
INAT_PATH = {"2018": (), "2019": ("path=/data/inat2019",)}


def _evaluation_rows() -> list[Row]:
    """Table 7 (robustness) and Table 8 (iNaturalist) of the 800-epoch MAE and MFF rows; Fig. 6 (partial
    fine-tuning of the 800-epoch PR-MIM ViT-B/16)."""
    rows = []
    pretrainings = {
        "mae": ("table3/mae-b16-e800", "table3/partial-50-b16-e800", "table3/prmim-50-b16-e800"),
        "mff": ("table4/mff", "table4/mff-partial-50", "table4/mff-prmim-50"),
    }
    table7 = {
        "mae": ("51.2 / 34.6 / 49.4 / 35.2", "51.9 / 32.9 / 49.4 / 36.0", "51.4 / 35.4 / 49.7 / 36.4"),
        "mff": ("49.0 / 37.2 / 51.0 / 36.8", "50.5 / 35.6 / 51.7 / 37.6", "49.9 / 37.9 / 52.1 / 37.6"),
    }
    table8 = {
        "mae": (("72.5", "78.9"), ("71.8", "78.2"), ("72.4", "79.0")),
        "mff": (("73.5", "79.8"), ("72.5", "78.5"), ("73.3", "79.8")),
    }
    for framework, sources in pretrainings.items():
        finetune = "finetune_in1k.py" + ("" if framework == "mae" else f":framework={framework}")
        for source, robustness, inat in zip(sources, table7[framework], table8[framework], strict=True):
            name = source.partition("/")[2]
            rows.append(
                Row(
                    f"table7/{name}",
                    f"robustness of the fine-tuned {source}",
                    None,
                    _with(finetune, "robustness"),
                    robustness,
                    "ImageNet-C mCE / -A / -R / -Sketch top-1",
                    from_row=source,
                )
            )
            for year, number in zip(("2018", "2019"), inat, strict=True):
                rows.append(
                    Row(
                        f"table8/{name}-inat{year[2:]}",
                        f"iNaturalist {year} fine-tuning of {source}",
                        None,
                        _with("finetune_inat.py", f"dataset=inat{year}", f"framework={framework}", *INAT_PATH[year]),
                        number,
                        f"iNaturalist {year} top-1",
                        from_row=source,
                    )
                )
    for blocks in range(13):
        rows.append(
            Row(
                f"fig6/blocks-{blocks}",
                f"the last {blocks} blocks of the 800-epoch PR-MIM ViT-B/16 fine-tuned (0: linear probe)",
                None,
                f"finetune_in1k.py:blocks={blocks}",
                None,
                "top-1 (a curve in Fig. 6)",
                from_row="table3/prmim-50-b16-e800",
            )
        )
    return rows


ROWS = tuple(_mae_rows() + _framework_rows() + _table6_rows() + _evaluation_rows())
BY_ID = {row.id: row for row in ROWS}


def row(row_id: str) -> Row:
    """The row ``row_id``; ``KeyError`` naming the closest ids (and how to list them) for any other."""
    if row_id in BY_ID:
        return BY_ID[row_id]
    tables = tuple(dict.fromkeys(r.table for r in ROWS))
    if row_id.partition("/")[0] not in tables:
        hint = (
            f" The rows cover {', '.join(tables)}; Tables 9 and 10 (ADE20K, COCO) run in the downstream tools on an "
            "export (docs/downstream.md)."
        )
    else:
        close = config_args.closest(row_id, BY_ID)
        hint = f" Did you mean {close!r}?" if close else ""
    raise KeyError(f"no row {row_id!r} in the paper's tables.{hint} `python -m configs.rows` lists every row.")


def pretraining_of(row_: Row) -> Row:
    """The row whose pretraining ``row_`` fine-tunes (itself unless it evaluates another's)."""
    return BY_ID[row_.from_row] if row_.from_row else row_


TEACHER = "--config.method.teacher.checkpoint=<the iBOT ViT-B/16 teacher, .pth>"
# runlocal: a MAE runlocal run stands in for TEC's teacher (the ViT size every runlocal ViT has).
RUNLOCAL_TEACHER = "pretrain_in1k.py:method=mae,runlocal"


def commands(row_: Row, workdirs: str = "workdirs", runlocal: bool = False) -> list[str]:
    """The shell commands of ``row_``: its pretraining (that of ``from_row`` for an evaluation row; TEC's with a
    teacher run first under ``runlocal``), then its fine-tuning from that run."""
    source = pretraining_of(row_)
    pretrain_dir = f"{workdirs}/{source.id.replace('/', '_')}"
    finetune_dir = f"{workdirs}/{row_.id.replace('/', '_')}_ft"
    local = ("runlocal",) if runlocal else ()
    pretrain = f"python -m prmim_jax.main --config configs/{_with(source.pretrain, *local)} --workdir {pretrain_dir}"
    before = []
    if source.teacher and runlocal:
        teacher_dir = f"{workdirs}/teacher"
        before = [f"python -m prmim_jax.main --config configs/{RUNLOCAL_TEACHER} --workdir {teacher_dir}"]
        pretrain += f" \\\n    --config.method.teacher.workdir={teacher_dir}"
    elif source.teacher:
        pretrain += f" \\\n    {TEACHER}"
    finetune = (
        f"python -m prmim_jax.main --config configs/{_with(row_.finetune, *local)} --workdir {finetune_dir} \\\n"
        f"    --config.init.workdir={pretrain_dir}"
    )
    return [*before, pretrain, finetune]


def rows_markdown() -> str:
    lines = [
        "| row | experiment | pretraining | fine-tuning | paper |",
        "|---|---|---|---|---|",
    ]
    for r in ROWS:
        pretrain = f"`{r.pretrain}`" if r.pretrain else f"as `{r.from_row}`"
        number = "not reported" if r.paper is None else r.paper + ("" if r.metric == "top-1" else f" ({r.metric})")
        lines.append(f"| `{r.id}` | {r.description} | {pretrain} | `{r.finetune}` | {number} |")
    return "\n".join(lines)


def _value_text(value) -> str:
    if isinstance(value, recipes.Epochs):
        return f"{value.epochs:g} epochs"
    if isinstance(value, tuple):
        return "(" + ", ".join(_value_text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def recipes_markdown() -> str:
    """The recipe table (``configs.recipes``) as markdown: one section per recipe."""
    out = []
    for recipe in recipes.RECIPES:
        out += [f"### {recipe.title}", "", f"`configs/{recipe.config}`", ""]
        out += ["| setting | official | source | ours | deviation |", "|---|---|---|---|---|"]
        for s in recipe.settings:
            ours = "in the code" if s.key == recipes.NOT_IN_CONFIG else f"`{s.key}` = `{_value_text(s.value)}`"
            out.append(f"| {s.name} | {s.official} | {s.source} | {ours} | {s.deviation or '-'} |")
        out.append("")
    return "\n".join(out)


def markdown() -> str:
    """``docs/recipes.md``."""
    repositories = "\n".join(f"- {repo} at `{commit}`" for repo, commit in recipes.REPOSITORIES.items())
    return "\n".join(
        [
            "# Recipes and the paper's rows",
            "",
            "Generated by `python -m configs.rows --markdown > docs/recipes.md` from `configs/recipes.py` and",
            "`configs/rows.py`; `tests/test_recipes.py` checks every config against the first table and this file",
            "against both. Learning rates are ours, per 256 images; official files were read at:",
            "",
            repositories,
            "",
            "## Recipes",
            "",
            recipes_markdown(),
            "## Where the issue's account of the official recipes was wrong or incomplete",
            "",
            *(f"- {text} ({source})." for text, source in recipes.CORRECTIONS),
            "",
            "## Rows",
            "",
            "Each row runs as `python -m configs.rows <row>` prints it: the pretraining, then the fine-tuning",
            "from it. Table 7 and 8 rows fine-tune (or evaluate) the named row's pretraining.",
            "",
            rows_markdown(),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m configs.rows", description=__doc__.split("\n\n")[0])
    parser.add_argument("row", nargs="?", help="a row id (no id: list every row)")
    parser.add_argument("--runlocal", action="store_true", help="the row's runlocal commands")
    parser.add_argument("--workdirs", default="workdirs", help="where the runs go (a folder or gs:// bucket)")
    parser.add_argument("--markdown", action="store_true", help="print docs/recipes.md")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
        return 0
    if args.row is None:
        for r in ROWS:
            print(f"{r.id:34s} {'-' if r.paper is None else r.paper:>26s}  {r.description}")
        return 0
    try:
        chosen = row(args.row)
    except KeyError as error:
        print(error.args[0], file=sys.stderr)
        return 2
    print(f"# {chosen.id}: {chosen.description}")
    for command in commands(chosen, args.workdirs, args.runlocal):
        print(command)
    if chosen.paper is None:
        print("# the paper reports no number for this row")
    else:
        print(f"# the paper: {chosen.paper} ({chosen.metric})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
