"""The GPU device check (benchmarks/device_check.sh) runs, end to end, where CI runs: on the CPU.

One ``--smoke`` run (tiny shapes, the project's .venv) goes through every phase the
GPU machine runs; the tests read its tables. The parts that only a GPU reaches (the
allocator's peaks, the batch that fills a card, MFU against a card's peak) are
checked on fakes; the carried-wheel install on a wheel built here.
"""

import base64
import hashlib
import importlib.util
import json
import os
import pathlib
import subprocess
import zipfile

import pytest
from conftest import run_once_per_session, tiny_model_config, xla_flags

ROOT = pathlib.Path(__file__).parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


device_check = _load("device_check")


def run_script(*args, env=None, timeout=900):
    """``bash benchmarks/device_check.sh ARGS`` as CI would run it: the .venv interpreter, one CPU device (compiled
    without LLVM's optimisations, as every test process is)."""
    environ = {key: value for key, value in os.environ.items() if key not in ("PYTHON", "PRMIM_WHEELS")}
    environ["XLA_FLAGS"] = xla_flags(1)
    environ.update(env or {})
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``(run JSON, tables markdown)`` of one ``--smoke`` run of every phase."""

    def produce(out):
        result = run_script("--smoke", str(out))
        assert result.returncode == 0, result.stderr[-3000:] + (out / "device_check.log").read_text()[-3000:]

    out = run_once_per_session(tmp_path_factory, "device_check_smoke", produce)
    return json.loads((out / "device_check.json").read_text()), (out / "device_check.md").read_text()


def section(markdown, title_start):
    """The lines of the markdown section whose title starts with ``title_start``."""
    chunks = markdown.split("\n## ")
    return next(chunk for chunk in chunks if chunk.startswith(title_start)).splitlines()


def table_rows(lines):
    """Table body rows as lists of cell strings."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    return rows[1:]  # the header


def test_smoke_run_finishes_every_phase(smoke):
    run, _ = smoke
    assert run["phases_requested"] == ["vit_b", "torch", "vit_l", "flags"]
    assert {name: phase["status"] for name, phase in run["phases"].items()} == dict.fromkeys(
        run["phases_requested"], "ok"
    )


def test_vit_b_table_has_mae_partial_and_prmim_at_three_throw_ratios(smoke):
    run, markdown = smoke
    rows = table_rows(section(markdown, "(a) ViT-B/16"))
    assert {(row[0], row[1]) for row in rows} == {("mae", "0")} | {
        (method, rho) for method in ("partial", "prmim") for rho in ("0.25", "0.5", "0.65")
    }
    assert all(row[-1] == "ok" and float(row[2].replace(",", "")) > 0 for row in rows)
    assert next(row for row in rows if row[0] == "mae")[3] == "1.000"  # step time / MAE
    results = run["phases"]["vit_b"]["result"]["rows"]
    mae = next(row for row in results if row["method"] == "mae")
    for row in results:
        if row["method"] != "mae":  # throwing tokens saves FLOPs and memory, the more the higher rho_d
            assert row["model_flops"] < mae["model_flops"] and row["compiled_bytes"] < mae["compiled_bytes"]


def test_pytorch_table_has_the_transformers_step_and_our_ratio_to_it(smoke):
    run, markdown = smoke
    pytorch, ours = table_rows(section(markdown, "(b) The same MAE step in PyTorch"))
    assert (
        pytorch[0].startswith("PyTorch, transformers ViTMAEForPreTraining") and float(pytorch[2].replace(",", "")) > 0
    )
    assert ours[0] == "ours, MAE (JAX)" and float(ours[3]) > 0  # ours / PyTorch, same batch
    torch_result = run["phases"]["torch"]["result"]
    assert torch_result["compile_backend"] == "aot_eager" and torch_result["graph_breaks"] == 0


def test_vit_l_table_has_mae_and_prmim_at_half(smoke):
    _, markdown = smoke
    rows = table_rows(section(markdown, "(c) ViT-L/16"))
    assert {("mae", "0"), ("prmim", "0.5"), ("partial", "0.5")} == {(row[0], row[1]) for row in rows}
    assert all(row[-1] == "ok" for row in rows)


def test_flags_table_measures_every_candidate_against_the_defaults(smoke):
    _, markdown = smoke
    rows = {row[0]: row for row in table_rows(section(markdown, "(d) XLA flags"))}
    assert set(rows) >= {"defaults"} | {variant["name"] for variant in device_check.FLAG_VARIANTS}
    assert rows["defaults"][3] == "1.000"
    for variant in device_check.FLAG_VARIANTS:
        status = rows[variant["name"]][-1]
        assert status == ("skipped: GPU only" if variant.get("gpu_only") else "ok"), (variant["name"], status)
        if status == "ok":
            assert float(rows[variant["name"]][3]) > 0


def test_every_flag_the_launcher_sets_is_measured():
    launcher = device_check.launcher_xla_flags()
    assert launcher, "launch/lib.sh sets no GPU flag"
    measured = device_check.phase_spec("flags", smoke=True, vit_b=None)["flags"]
    for name, value in launcher.items():
        assert any(variant.get("xla", {}).get(name) == value and variant["launcher"] for variant in measured), name


def test_time_guard_keeps_what_was_measured_when_the_budget_runs_out(tmp_path):
    result = run_script("--smoke", "--phases", "vit_b", "--budget", "1", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "device_check.json").read_text())
    vit_b = run["phases"]["vit_b"]["result"]
    assert [(row["method"], row["status"]) for row in vit_b["rows"]] == [("mae", "ok")]
    assert any(note.startswith("out of time") for note in vit_b["notes"])
    assert "| mae | 0 |" in (tmp_path / "device_check.md").read_text()


def test_without_a_gpu_only_the_smoke_run_starts(tmp_path):
    result = run_script(str(tmp_path / "out"), env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 2 and "--smoke" in result.stderr
    assert not (tmp_path / "out").exists()


def test_phases_the_budget_cannot_fit_are_skipped_and_reported(tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3'\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    result = run_script("--budget", "0", str(tmp_path / "out"), env=env, timeout=120)
    assert result.returncode == 1
    run = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert {phase["status"] for phase in run["phases"].values()} == {"skipped: out of time"}
    assert (tmp_path / "out" / "device_check.md").read_text().count("skipped: out of time") == 4


def test_allocator_peaks_are_each_programs_own_and_lower_readings_are_bounds():
    step_time = _load("step_time")
    high_water = {"peak_bytes_in_use": 5}  # what compilation left

    def program(footprint, peak):
        def step(state, data, rng):
            high_water["peak_bytes_in_use"] = max(high_water["peak_bytes_in_use"], peak)
            return state, {}

        return {"compiled_bytes": footprint, "compiled": step, "init": lambda: ({}, {})}

    # Run by footprint: 10 raises the mark, 30 raises it, 20 stays under 30: only a bound.
    programs = [program(3, 20), program(1, 10), program(2, 30)]
    assert step_time.allocator_peaks(programs, memory_stats=lambda: high_water) == [-30, 10, 30]
    assert step_time.allocator_peaks(programs, memory_stats=lambda: None) == [None] * 3


@pytest.mark.parametrize(
    ("shape", "pool_gib", "batch"),
    [("B/16", 0.9 * 80, 512), ("L/16", 0.9 * 80, 256), ("L/16", 0.9 * 141, 512), ("B/16", 8, 32)],
)
def test_batch_fills_four_fifths_of_the_memory_pool(shape, pool_gib, batch):
    full = {"B/16": device_check.VIT_B16, "L/16": device_check.VIT_L16}[shape]
    assert device_check.choose_batch(full, pool_gib * 2**30, smoke=False) == batch


def test_gpu_table_reports_allocator_peaks_bounds_and_mfu_against_the_card():
    row = dict(variant="defaults", status="ok", model_flops=1e13, compile_seconds=30.0, compiled_bytes=9 * 2**30)
    result = {
        "label": "ViT-B/16",
        "batch": 512,
        "device": "NVIDIA H100 80GB HBM3",
        "backend": "gpu",
        "peak_flops_bf16": 989e12,
        "matmul_flops": 800e12,
        "rows": [
            dict(row, method="mae", rho_d=0.0, step_seconds=0.1, images_per_second=5120.0, allocator_peak_bytes=2**35),
            dict(
                row,
                method="prmim",
                rho_d=0.5,
                step_seconds=0.08,
                images_per_second=6400.0,
                allocator_peak_bytes=2**34,
                allocator_peak_is_bound=True,
            ),
        ],
    }
    lines = device_check.jax_table(result)
    assert "the allocator's peak" in lines[0] and "989 TFLOP/s" in lines[0]
    mae, prmim = table_rows(lines[2:])
    assert mae[2:8] == ["5,120", "1.000", "32.00", "1.000", "10.1%", "12.5%"]  # 1e13 FLOPs in 0.1 s
    assert prmim[2:6] == ["6,400", "0.800", "<=16.00", "<=0.500"]


# Carried wheels (the GPU machine has no registry)


def write_wheel(directory: pathlib.Path, distribution: str, module: str, text: str) -> pathlib.Path:
    """A minimal pure-Python wheel of ``distribution`` 1.0 holding ``module.py``."""
    files = {
        f"{module}.py": text,
        f"{distribution}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n",
        f"{distribution}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data.encode()).digest()).rstrip(b'=').decode()},"
        f"{len(data.encode())}"
        for name, data in files.items()
    ]
    files[f"{distribution}-1.0.dist-info/RECORD"] = (
        "\n".join([*record, f"{distribution}-1.0.dist-info/RECORD,,"]) + "\n"
    )
    path = directory / f"{distribution}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def check_env(wheels: pathlib.Path, imports: str):
    result = run_script("--check_env", env={"PRMIM_WHEELS": str(wheels), "PRMIM_CHECK_IMPORTS": imports}, timeout=120)
    shown = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return result, shown


def test_a_missing_import_is_installed_from_the_carried_wheels_and_nothing_else(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    write_wheel(wheels, "prmim_probe", "prmim_probe", "ANSWER = 42\n")
    write_wheel(wheels, "numpy", "numpy", "raise ImportError('a carried wheel shadowed the installed numpy')\n")
    result, shown = check_env(wheels, "json prmim_probe numpy")
    assert result.returncode == 0, result.stderr
    assert "installing 1 carried wheels" in result.stderr
    site = pathlib.Path(shown["PYTHONPATH"].split(":")[-1])
    assert (site / "prmim_probe.py").is_file() and not (site / "numpy.py").exists()
    probe = subprocess.run(
        [shown["python"], "-c", "import numpy, prmim_probe; print(prmim_probe.ANSWER)"],
        env=dict(os.environ, PYTHONPATH=shown["PYTHONPATH"]),
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "42", probe.stderr


def test_nothing_is_installed_when_every_import_is_there(tmp_path):
    result, shown = check_env(tmp_path, "json")
    assert result.returncode == 0, result.stderr
    assert shown["python"] == str(ROOT.resolve() / ".venv" / "bin" / "python")
    assert shown["PYTHONPATH"].split(":")[0] == str(ROOT.resolve())
    assert "installing" not in result.stderr


def test_a_missing_import_with_no_carried_wheel_stops_the_check_with_a_message(tmp_path):
    result, _ = check_env(tmp_path, "prmim_absent_module")
    assert result.returncode == 1
    assert "prmim_absent_module" in result.stderr and "no carried wheel" in result.stderr


def test_flag_values_become_the_types_xla_options_take():
    assert device_check.parse_flag("--xla_a=true") == ("xla_a", True)
    assert device_check.parse_flag("--xla_b=False") == ("xla_b", False)
    assert device_check.parse_flag("--xla_c=32") == ("xla_c", 32)
    assert device_check.parse_flag("--xla_d=''") == ("xla_d", "")
    assert device_check.parse_flag("--xla_e=FUSION,CUBLAS") == ("xla_e", "FUSION,CUBLAS")


def test_model_flops_are_counted_where_xla_cannot_count_the_traced_step(monkeypatch):
    # On a GPU, XLA gives no count for a traced step that calls cuDNN's attention (jax 0.11.2, H200): the
    # model FLOPs then come from the same step with XLA's attention, so MFU is still reported.
    import jax

    step_time = _load("step_time")
    config = tiny_model_config()
    counted = step_time.prepare(config, "prmim", 0.5, 2, materialize=False)["model_flops"]
    real_cost_analysis = jax.stages.Lowered.cost_analysis
    uncounted = []

    def no_count_for_the_first_program(self):
        if not uncounted:
            uncounted.append(self)
            return None
        return real_cost_analysis(self)

    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", no_count_for_the_first_program)
    assert step_time.prepare(config, "prmim", 0.5, 2, materialize=False)["model_flops"] == counted > 0
    assert uncounted
