"""Signals and failures end to end, with real processes: each run stops within seconds, leaves a checkpoint
that resumes, and says why it stopped.

Every run is ``test_train.tiny_config`` (a 7x7-grid ViT, milliseconds a step) through the real entry point,
``launch/local.sh`` or ``python -m prmim_jax.main``, so a test costs process start-up and compiling, which a
persistent compilation cache shares between runs. Signals land at the intended moment by polling for the
log lines and checkpoint directories that mark it; where that moment is too short to hit from outside (a
step of a six-step run, the final save, the final evaluation), the test's config file makes the process send
SIGTERM to itself there. (These replace test_train's SIGTERM test, which trained 400 steps for 72 s.)
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import xla_flags
from PIL import Image
from test_train import tiny_config

from prmim_jax import methods, preemption
from prmim_jax.data import pipeline

ROOT = pathlib.Path(__file__).parent.parent
TESTS = pathlib.Path(__file__).parent

# The runs' config: test_train's tiny config (6 steps, checkpoints every 3). SIGTERM_AT (test only) makes the
# process send itself SIGTERM at a moment too short to hit from outside: "step N" right after step N's
# progress line, "final_save" right after the final save started, "final_evaluation" as the kNN starts.
CONFIG = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_train import tiny_config

def get_config(arg=None):
    config = tiny_config(batch_size=8)
    config.evals.knn.update(train_examples=40, test_examples=20, batch_size=20)
    return config

def _sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)

_moment = os.environ.get("SIGTERM_AT", "")
if _moment.startswith("step "):
    from prmim_jax import metrics
    _log = metrics.MetricWriter.log
    def _log_then_sigterm(self, line):
        _log(self, line)
        if line.startswith(_moment + "/"):
            _sigterm_self()
    metrics.MetricWriter.log = _log_then_sigterm
if _moment == "final_save":
    from prmim_jax import checkpoint
    _save = checkpoint.Checkpointer.save
    def _save_then_sigterm(self, step, *args, **kwargs):
        started = _save(self, step, *args, **kwargs)
        if step == get_config().total_steps:
            _sigterm_self()
        return started
    checkpoint.Checkpointer.save = _save_then_sigterm
if _moment == "final_evaluation":
    from prmim_jax.evaluate import knn
    _run = knn.Evaluator.run
    def _sigterm_then_run(self, state):
        _sigterm_self()
        return _run(self, state)
    knn.Evaluator.run = _sigterm_then_run
"""

STOPPED_WITHIN_SECONDS = 20  # after a failure, every process and the launcher are gone within this


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """``(config path, env)`` for the runs: one CPU device a process, a compilation cache shared by the runs."""
    directory = tmp_path_factory.mktemp("failures")
    config = directory / "tiny.py"
    config.write_text(CONFIG.format(tests=str(TESTS)))
    # tensorboardX imports PyTorch when it can, 3 s a process; only the test environment has it
    # (requirements-test.txt), so the runs here go without it, as a real environment does.
    (directory / "without_torch").mkdir()
    (directory / "without_torch" / "torch.py").write_text('raise ImportError("no PyTorch in these runs")\n')
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(directory / "without_torch"), os.environ.get("PYTHONPATH")])),
        XLA_FLAGS=xla_flags(1),
        PRMIM_PLATFORM="cpu",
        PRMIM_VENV=sys.prefix,
        JAX_COMPILATION_CACHE_DIR=str(directory / "compilation_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env.pop("SIGTERM_AT", None)
    return config, env


def launch(environment, workdir, *flags, processes=2, env=None):
    """``launch/local.sh --processes N`` on the tiny config, in the background; its output goes to
    ``WORKDIR.launcher.out``."""
    config, base_env = environment
    output = open(f"{workdir}.launcher.out", "w")  # noqa: SIM115 (the launcher writes it until it ends)
    command = ["bash", str(ROOT / "launch" / "local.sh"), "--skip_setup", "--processes", str(processes)]
    return subprocess.Popen(
        [*command, str(config), str(workdir), *flags],
        cwd=ROOT,
        env=base_env | (env or {}),
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )


def launcher_output(workdir) -> str:
    return pathlib.Path(f"{workdir}.launcher.out").read_text()


def log(workdir, process: int = 0) -> str:
    path = pathlib.Path(workdir) / "logs" / f"process_{process}.log"
    return path.read_text() if path.exists() else ""


def wait_for(condition, process, what: str, timeout: float = 240):
    """Polls ``condition()`` until true; fails if ``process`` ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.02)


def running(workdir) -> dict[int, int]:
    """``{process id: pid}`` of the ``prmim_jax.main`` processes of the run in ``workdir`` still running."""
    found = {}
    for entry in pathlib.Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"prmim_jax.main" in argv and str(workdir).encode() in argv and b"--process_id" in argv:
            found[int(argv[argv.index(b"--process_id") + 1])] = int(entry.name)
    return found


def progress_lines(output: str) -> list[str]:
    return re.findall(r"^step \d+/\d+ .*$", output, flags=re.M)


def checkpoints(workdir) -> list[str]:
    directory = pathlib.Path(workdir) / "checkpoints"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def saved_steps(workdir) -> list[int]:
    return sorted(int(name) for name in checkpoints(workdir) if name.isdigit())


def resume_one_step(environment, workdir, processes=2) -> int:
    """Reruns the run in ``workdir`` for one step; returns the step it resumed from."""
    rerun = launch(environment, workdir, "--config.total_steps=100000", "--config.stop_after=1", processes=processes)
    assert rerun.wait(timeout=300) == 0, launcher_output(workdir)
    resumed = [line for line in log(workdir).splitlines() if line.startswith("resumed from step ")]
    assert resumed, log(workdir)
    step = int(resumed[0].split()[3])
    assert f"stop_after=1: saved step {step + 1}" in log(workdir)
    return step


def test_failure_line_names_process_type_and_message_and_launchers_match_it():
    line = preemption.failure_line(OSError("disk\nfull"))
    assert line == "process 0 of 1 failed: OSError: disk full"
    pattern = (ROOT / "launch" / "lib.sh").read_text().split("FAILURE_PATTERN='")[1].split("'")[0]
    shown = subprocess.run(["grep", "-E", pattern], input=line, capture_output=True, text=True)
    assert shown.stdout.strip() == line


def test_preemption_watch_defers_sigterm_in_training_and_stops_at_once_where_nothing_is_lost():
    previous = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionWatch() as watch:
        os.kill(os.getpid(), signal.SIGTERM)  # in training: noted, for the loop to save and stop
        assert watch.signalled and watch.should_stop(7)
        with pytest.raises(preemption.Preempted) as stopped, watch.interruptible("the final evaluation"):
            pass  # a SIGTERM that already came stops the next interruptible phase at its start
        assert stopped.value.phase == "the final evaluation"
    with preemption.PreemptionWatch() as watch:
        with pytest.raises(preemption.Preempted), watch.interruptible("set-up"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted at once
        assert watch.signalled
    assert signal.getsignal(signal.SIGTERM) == previous


def test_a_failing_process_prints_one_line_then_the_traceback_and_exits_1_obeying_sigterm(capsys):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit, preemption.exit_on_failure():
            raise ValueError("batch_size=12 must be divisible\nby 8")
        assert exit.value.code == 1
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # no longer noted and ignored
    finally:
        signal.signal(signal.SIGTERM, previous)
    first, second, *_ = capsys.readouterr().err.splitlines()
    assert first == "process 0 of 1 failed: ValueError: batch_size=12 must be divisible by 8"
    assert second == "Traceback (most recent call last):"


# --- two processes under launch/local.sh -----------------------------------------------------------


def test_sigterm_to_the_launcher_saves_a_step_that_resumes_and_a_sigkilled_process_stops_its_peer_in_seconds(
    environment, tmp_path
):
    workdir = tmp_path / "run"
    steps = "--config.total_steps=100000"

    # SIGTERM to the launcher: both processes save the step they agree on, end, and then the launcher exits 0.
    run = launch(environment, workdir, steps, "--config.checkpoint_every=100000")
    wait_for(lambda: "step 3/" in log(workdir), run, "step 3")
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 0, launcher_output(workdir)
    assert "stopped cleanly" in launcher_output(workdir)
    assert running(workdir) == {}
    (preempted,) = saved_steps(workdir)
    assert checkpoints(workdir) == [str(preempted)]  # complete: no partial step directory
    assert f"preempted: saved step {preempted}" in log(workdir)

    # The rerun resumes from that step. SIGKILL of one process between two saves: the other stops within
    # seconds, and the launcher names the killed process and exits with its status.
    run = launch(environment, workdir, steps, "--config.checkpoint_every=20")
    saved = (preempted // 20 + 1) * 20
    wait_for(lambda: saved in saved_steps(workdir) and f"step {saved + 3}/" in log(workdir), run, "a step after a save")
    assert f"resumed from step {preempted}" in log(workdir)
    os.kill(running(workdir)[1], signal.SIGKILL)
    killed = time.monotonic()
    status = run.wait(timeout=120)
    stopped = time.monotonic() - killed
    assert stopped < STOPPED_WITHIN_SECONDS, f"the launcher returned {stopped:.1f}s after the kill"
    output = launcher_output(workdir)
    assert status == 128 + signal.SIGKILL, output
    assert "process 1 failed first (status 137, killed by SIGKILL)" in output
    assert running(workdir) == {}  # the survivor is gone too

    # The newest checkpoint is intact and resumes.
    latest = max(saved_steps(workdir))
    assert latest >= saved
    assert resume_one_step(environment, workdir) == latest


def write_image_folder(root: pathlib.Path, images: int) -> None:
    """``root/{train,val}/c<k>/0.png``: one 28x28 grayscale image per class, so a label names its file."""
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", 20)):
        for k in range(count):
            (root / split / f"c{k:03d}").mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / split / f"c{k:03d}" / "0.png")


def test_an_exception_in_one_process_stops_both_within_seconds_and_the_launcher_shows_its_error(environment, tmp_path):
    images = tmp_path / "images"
    write_image_folder(images, images=64)
    data = dict(source="image_folder", path=str(images), eval_split="val")  # 28x28, one channel, as Fashion-MNIST
    # The image process 1 reads for its third step (a label names its file) is not an image at all.
    run_config = tiny_config(batch_size=8)
    run_config.data.update(data)
    host = methods.build(run_config).host
    batches = pipeline.train_dataset(run_config.data, host, global_batch=8, process_index=1, process_count=2)
    third = [batch for _, batch in zip(range(3), batches, strict=False)][2]
    corrupt = images / "train" / f"c{int(third['labels'][0]):03d}" / "0.png"
    corrupt.write_bytes(b"this is not an image")

    workdir = tmp_path / "run"
    flags = [f"--config.data.{key}={value}" for key, value in data.items()]
    run = launch(environment, workdir, *flags, "--config.total_steps=100000")
    status = run.wait(timeout=300)
    output = launcher_output(workdir)
    assert status == 1, output
    assert "process 1 failed first (status 1)" in output
    failure = next(line for line in output.splitlines() if line.startswith("process 1 of 2 failed: "))
    assert str(corrupt) in failure
    assert "Traceback" not in failure and "Fatal Python error" not in output
    # Process 0 was waiting for process 1 in a collective; it stopped within seconds of process 1.
    ended = [(workdir / "logs" / f"process_{i}.log").stat().st_mtime for i in (0, 1)]
    assert abs(ended[0] - ended[1]) < STOPPED_WITHIN_SECONDS
    assert "step 2/" in log(workdir) and "step 3/" not in log(workdir)


# --- one process: SIGTERM in training, in the final save, in the final evaluation -------------------


def main_run(environment, workdir, sigterm_at):
    """``python -m prmim_jax.main`` on the tiny config, SIGTERM at ``sigterm_at`` (see ``CONFIG``); its stdout."""
    config, env = environment
    command = [sys.executable, "-m", "prmim_jax.main", "--config", str(config), "--workdir", str(workdir)]
    result = subprocess.run(
        command, cwd=ROOT, env=env | {"SIGTERM_AT": sigterm_at}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_sigterm_in_training_the_final_save_or_the_final_evaluation_exits_0_and_the_rerun_goes_on_from_there(
    environment, tmp_path
):
    workdir = tmp_path / "run"
    # In training: the step just taken is saved.
    training = main_run(environment, workdir, sigterm_at="step 2")
    assert progress_lines(training)[-1].startswith("step 2/6 ")
    assert "preempted: saved step 2" in training
    assert checkpoints(workdir) == ["2"]

    # In the final save: it completes, and the final evaluation is left to the rerun.
    saving = main_run(environment, workdir, sigterm_at="final_save")
    assert "resumed from step 2" in saving
    assert [line.split(" |")[0] for line in progress_lines(saving)] == [f"step {i}/6" for i in range(3, 7)]
    assert "preempted after the final step: step 6 is saved" in saving
    assert "kNN" not in saving
    assert checkpoints(workdir) == ["2", "3", "6"]  # complete: no orbax-checkpoint-tmp directory

    # In the final evaluation: the rerun trains nothing, it only evaluates.
    evaluating = main_run(environment, workdir, sigterm_at="final_evaluation")
    assert "resumed from step 6" in evaluating and progress_lines(evaluating) == []
    assert "preempted during the final evaluation: the final step 6 is saved" in evaluating
    assert checkpoints(workdir) == ["2", "3", "6"]
