"""The cost report and the sampler and CPU side-by-side benchmarks produce what their committed results claim to be."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from prmim_jax.tools import cost

_spec = importlib.util.spec_from_file_location(
    "samplers", pathlib.Path(__file__).parent.parent / "benchmarks" / "samplers.py"
)
sampler_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sampler_benchmark)


def test_cost_report_rows_are_per_image_counts_with_ratios_to_mae(tmp_path):
    rows = cost.report(
        ["Ti/8"],
        [0.5],
        batch=2,
        image_size=64,
        log=lambda _: None,
        depth=1,
        decoder_width=64,
        decoder_depth=1,
        decoder_num_heads=4,
    )
    assert [(r["method"], r["rho_d"]) for r in rows] == [("mae", 0.0), ("partial", 0.5), ("prmim", 0.5)]
    mae, partial, prmim = rows
    assert mae["forward_flops_ratio"] == mae["step_flops_ratio"] == 1.0
    assert partial["forward_flops"] < prmim["forward_flops"] < mae["forward_flops"]
    assert (
        2 * mae["forward_flops"] < mae["step_flops"] < 4 * mae["forward_flops"]
    )  # a backward pass costs about two forwards
    assert all(r["temp_bytes"] > 0 for r in rows)


def test_cost_report_covers_every_framework_and_aggregation_design():
    rows = cost.report(
        ["Ti/8"],
        [0.5],
        batch=2,
        image_size=64,
        log=lambda _: None,
        framework="simmim",
        aggregators=("dwconv", "avgpool"),
        kernel_sizes=(3, 5),
        depth=1,
    )
    assert [(r["method"], r["aggregator"], r["kernel_size"]) for r in rows] == [
        ("simmim", None, None),
        ("partial", None, None),
        ("prmim", "dwconv", 3),
        ("prmim", "dwconv", 5),
        ("prmim", "avgpool", 3),
        ("prmim", "avgpool", 5),
    ]
    simmim, partial, *progressive = rows
    # SimMIM's encoder sees every token; partial drops the thrown half of them from its sequence.
    assert partial["forward_flops"] < 0.75 * simmim["forward_flops"]
    assert all(partial["forward_flops"] < r["forward_flops"] < simmim["forward_flops"] for r in progressive)
    assert rows[2]["forward_flops"] < rows[3]["forward_flops"]  # a wider window costs more


def test_cost_command_writes_json_and_markdown(tmp_path):
    out = tmp_path / "cost"
    argv = ["--models", "Ti/16", "--throw_ratios", "0.5", "--batch", "1", "--image_size", "32", "--out", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            cost,
            "report",
            lambda *a, **k: [
                dict(
                    model="ViT-Ti/16",
                    method="mae",
                    sampler="random",
                    rho_d=0.0,
                    forward_flops=1.0,
                    step_flops=3.0,
                    temp_bytes=8,
                    forward_flops_ratio=1.0,
                    step_flops_ratio=1.0,
                    temp_bytes_ratio=1.0,
                )
            ],
        )
        cost.main(argv)
    rows = json.loads(out.with_suffix(".json").read_text())
    assert set(rows[0]) >= {"model", "method", "sampler", "rho_d", "forward_flops", "step_flops", "temp_bytes"}
    assert "| ViT-Ti/16 | mae |" in out.with_suffix(".md").read_text()


def test_sampler_benchmark_reports_every_sampler_and_coverage(tmp_path):
    sampler_benchmark.main(["--batch", "8", "--repeats", "1", "--out", str(tmp_path / "s")])
    result = json.loads((tmp_path / "s.json").read_text())
    assert set(result["throughput"]) == {"random", "random_throw", "furthest", "furthest_seeded"}
    assert len(result["coverage"]) == 9 and all(0 <= r["uncovered_3x3"] <= 1 for r in result["coverage"])
    granular = {(r["rho_d"], r["sampler"], r["granularity"]): r for r in result["granularity_coverage"]}
    assert len(granular) == 8 and set(result["granularity_throughput"]) == {"token", "unit"}
    # masking's reason for throwing tokens: furthest token throwing leaves no thrown token without a neighbour
    assert granular[(0.3, "furthest", "token")]["uncovered_3x3"] == 0
    assert granular[(0.3, "furthest", "unit")]["uncovered_3x3"] > 0


def test_cpu_component_benchmark_times_every_part_of_both_frameworks(tmp_path):
    # A subprocess: the benchmark sets torch's and XLA's thread counts for its whole process.
    script = pathlib.Path(__file__).parent.parent / "benchmarks" / "cpu_side_by_side.py"
    command = [sys.executable, str(script), "--smoke", "--components", "--threads", "1", "--rounds", "1"]
    subprocess.run([*command, "--out", str(tmp_path / "c")], check=True, capture_output=True, timeout=600)
    medians = json.loads((tmp_path / "c.json").read_text())["median_cpu_seconds"]
    parts = [f"{where} {kind}" for where in ("decoder", "encoder") for kind in ("block", "attention", "mlp")]
    for part in parts:  # the parts with linear layers: ours both ways, and transformers'
        assert set(medians[part]) == {"ours", "ours, not flattened", "transformers"}, part
    assert set(medians["decoder attention core"]) == set(medians["AdamW update"]) == {"ours", "transformers"}
    assert all(seconds > 0 for per in medians.values() for seconds in per.values())
    assert "| decoder block |" in (tmp_path / "c.md").read_text()


def test_cpu_side_by_side_refuses_a_depth_below_one_before_building_anything(capsys):
    spec = importlib.util.spec_from_file_location(
        "cpu_side_by_side", pathlib.Path(__file__).parent.parent / "benchmarks" / "cpu_side_by_side.py"
    )
    side_by_side = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(side_by_side)
    with pytest.raises(SystemExit):
        side_by_side.main(["--smoke", "--decoder_depth", "0"])
    assert "--decoder_depth 0: a transformer needs at least 1 block." in capsys.readouterr().err


def test_design_choice_benchmark_measures_every_choice_the_docstrings_cite(tmp_path):
    # A subprocess: the benchmark sets XLA's thread count for its whole process.
    script = pathlib.Path(__file__).parent.parent / "benchmarks" / "design_choices.py"
    subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path / "d")], check=True, timeout=600)
    result = json.loads((tmp_path / "d.json").read_text())["result"]
    assert [r["step"].split(" (")[0] for r in result["precision"]] == [
        "float32",
        "bfloat16",
        "bfloat16, bfloat16 residual stream",
        "bfloat16, LayerNorm emits float32",
    ]
    kept = [r["kept_activation_bytes"] for r in result["remat"]]
    assert kept[0] > kept[1] > kept[2] > 0  # none > dots_saveable > full
    # Each faster form computes what it replaces.
    assert result["gelu"]["max_abs_difference"] < 1e-5
    assert result["depthwise"]["max_abs_difference"] < 1e-5
    assert result["normalize"]["max_abs_difference"] < 1e-5
    assert len(result["attention"]) == 2
    assert all(r["max_abs_difference"] < 1e-5 for r in result["attention"])
    assert result["sha256"]["gb_per_cpu_second"] > 0
