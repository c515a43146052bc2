"""The launch scripts print (--dry_run) and run exactly the set-up and training commands, pass stop
signals on, wait for their processes to save, and show the error of the process that failed first.

Each test copies launch/ into a bare repository tree with one config, so nothing here
needs gcloud, sbatch, a GPU or an environment, and nothing touches the real checkout; the
training processes are small bash scripts that fail, save or hang on cue (``STAGED_PYTHON``).
Dry-run output is one shell command a line; ``shlex.split`` turns it back into argv.
"""

import os
import pathlib
import re
import shlex
import shutil
import signal
import stat
import subprocess
import time

import pytest

LAUNCH = pathlib.Path(__file__).parent.parent / "launch"
SCRIPTS = ("local.sh", "tpu_pod.sh", "gpu_slurm.sh")
BASH = shutil.which("bash")
CLEARED = (
    "DRY_RUN",
    "PRMIM_PLATFORM",
    "PRMIM_VENV",
    "CUDA_VISIBLE_DEVICES",
    "TMPDIR",
    "XLA_FLAGS",
    "PRMIM_XLA_GPU_FLAGS",
    "PRMIM_TCMALLOC",
    "LD_PRELOAD",
)
# What the launchers see besides the test's own variables: tcmalloc off, so that what they print does not depend
# on whether this machine has it (the tcmalloc tests turn it on).
DEFAULTS = {"PRMIM_TCMALLOC": "0"}


@pytest.fixture
def repo(tmp_path):
    """A repository tree holding copies of the launch scripts and configs/tiny.py."""
    root = tmp_path / "repo"
    (root / "launch").mkdir(parents=True)
    for name in (*SCRIPTS, "lib.sh"):
        shutil.copy(LAUNCH / name, root / "launch" / name)
    (root / "configs").mkdir()
    (root / "configs" / "tiny.py").write_text("def get_config(arg=None):\n    return None\n")
    return root.resolve()


def launch(repo, script, *args, env=None):
    environ = {key: value for key, value in os.environ.items() if key not in CLEARED} | DEFAULTS
    environ.update(env or {})
    return subprocess.run(
        [BASH, f"launch/{script}", *args], cwd=repo, env=environ, capture_output=True, text=True, timeout=30
    )


def printed(result):
    """The argv of every command a dry run printed."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def main_command(python, config, workdir, *flags):
    return [python, "-m", "prmim_jax.main", "--config", config, "--workdir", workdir, *flags]


# launch/local.sh


def test_local_sets_up_the_environment_then_runs_main_with_flags_passed_through(repo):
    result = launch(
        repo,
        "local.sh",
        "--dry_run",
        "configs/tiny.py:runlocal",
        "work dir",
        "--config.total_steps=3",
        "--config.name=it's mine",
        env={"PRMIM_PLATFORM": "cpu"},
    )
    assert printed(result) == [
        ["bash", f"{repo}/launch/setup_env.sh", "cpu"],
        main_command(
            f"{repo}/.venv/bin/python",
            "configs/tiny.py:runlocal",
            "work dir",
            "--config.total_steps=3",
            "--config.name=it's mine",
        ),
    ]


def test_local_dry_run_from_the_environment_runs_nothing(repo):
    result = launch(repo, "local.sh", "configs/tiny.py", "wd", "--processes", "2", env={"DRY_RUN": "1"})
    assert len(printed(result)) == 5  # setup_env, mkdir, two processes, wait
    assert not (repo / ".venv").exists()
    assert not (repo / "wd").exists()


@pytest.mark.parametrize(
    ("platform", "nvidia_smi", "expected"),
    [("tpu", False, "tpu"), (None, True, "cuda"), ("cpu", True, "cpu")],
)
def test_local_platform_is_prmim_platform_else_cuda_where_nvidia_smi_exists(
    repo, tmp_path, platform, nvidia_smi, expected
):
    env = {}
    if platform:
        env["PRMIM_PLATFORM"] = platform
    if nvidia_smi:
        executable(tmp_path / "bin" / "nvidia-smi", "#!/bin/sh\nexit 0\n")
        env["PATH"] = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    commands = printed(launch(repo, "local.sh", "--dry_run", "configs/tiny.py", "wd", env=env))
    assert commands[0] == ["bash", f"{repo}/launch/setup_env.sh", expected]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_local_platform_defaults_to_cpu(repo):
    commands = printed(launch(repo, "local.sh", "--dry_run", "configs/tiny.py", "wd"))
    assert commands[0][-1] == "cpu"


def test_local_uses_prmim_venv_and_skip_setup_skips_setup_env(repo):
    result = launch(
        repo, "local.sh", "--skip_setup", "--dry_run", "configs/tiny.py", "wd", env={"PRMIM_VENV": "/opt/prmim env"}
    )
    assert printed(result) == [main_command("/opt/prmim env/bin/python", "configs/tiny.py", "wd")]


def test_local_processes_run_one_command_each_with_coordinator_flags_and_own_log(repo):
    result = launch(
        repo,
        "local.sh",
        "--processes",
        "2",
        "--dry_run",
        "configs/tiny.py",
        "wd",
        "--config.x=1",
        env={"PRMIM_PLATFORM": "cpu"},
    )
    setup, mkdir, *processes, wait = printed(result)
    assert setup == ["bash", f"{repo}/launch/setup_env.sh", "cpu"]
    assert mkdir == ["mkdir", "-p", "wd/logs"]
    assert wait == ["wait"]
    assert len(processes) == 2
    ports = set()
    for i, argv in enumerate(processes):
        assert argv[-4:] == [">", f"wd/logs/process_{i}.log", "2>&1", "&"]
        command = argv[:-4]
        assert command[:7] == main_command(f"{repo}/.venv/bin/python", "configs/tiny.py", "wd")
        assert command[-1] == "--config.x=1"
        flags = command[7:-1]
        assert flags[0] == "--coordinator_address"
        assert re.fullmatch(r"localhost:\d+", flags[1])
        ports.add(flags[1])
        assert flags[2:] == ["--num_processes", "2", "--process_id", str(i)]
    assert len(ports) == 1


def test_local_processes_on_cuda_see_one_gpu_each(repo):
    env = {"PRMIM_PLATFORM": "cuda", "CUDA_VISIBLE_DEVICES": "4,6"}
    result = launch(repo, "local.sh", "--processes=2", "--port=4321", "--dry_run", "configs/tiny.py", "wd", env=env)
    processes = printed(result)[3:5]  # after the set-up, XLA_FLAGS and mkdir
    assert [argv[:2] for argv in processes] == [["env", "CUDA_VISIBLE_DEVICES=4"], ["env", "CUDA_VISIBLE_DEVICES=6"]]
    assert all("localhost:4321" in argv for argv in processes)


def xla_gpu_flags(env=None):
    """What launch/lib.sh's ``xla_gpu_flags`` prints: the launchers' XLA flags on GPU."""
    environ = {key: value for key, value in os.environ.items() if key not in CLEARED}
    environ.update(env or {})
    shown = subprocess.run(
        [BASH, "-c", f"source {LAUNCH / 'lib.sh'}; xla_gpu_flags"], env=environ, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    return shown.stdout.strip()


def test_launchers_gpu_flags_are_xla_gpu_flags_with_values():
    flags = xla_gpu_flags().split()
    assert flags
    assert all(re.fullmatch(r"--xla_gpu_\w+=\S+", flag) for flag in flags), flags


def test_local_on_cuda_exports_the_gpu_flags_before_the_users_own_xla_flags(repo):
    env = {"PRMIM_PLATFORM": "cuda", "XLA_FLAGS": "--xla_dump_to=/tmp/dump"}
    setup, export, main = printed(launch(repo, "local.sh", "--dry_run", "configs/tiny.py", "wd", env=env))
    assert setup == ["bash", f"{repo}/launch/setup_env.sh", "cuda"]
    assert export == ["export", f"XLA_FLAGS={xla_gpu_flags()} --xla_dump_to=/tmp/dump"]
    assert main == main_command(f"{repo}/.venv/bin/python", "configs/tiny.py", "wd")


@pytest.mark.parametrize(("platform", "expected"), [("cuda", True), ("cpu", False), ("tpu", False)])
def test_local_runs_main_with_the_gpu_flags_on_cuda_only(repo, platform, expected):
    executable(repo / ".venv" / "bin" / "python", '#!/bin/sh\necho "XLA_FLAGS=$XLA_FLAGS"\n')
    env = {"PRMIM_PLATFORM": platform, "XLA_FLAGS": "--mine=1"}
    result = launch(repo, "local.sh", "--skip_setup", "configs/tiny.py", "wd", env=env)
    assert result.returncode == 0, result.stderr
    flags = f"{xla_gpu_flags()} --mine=1" if expected else "--mine=1"
    assert result.stdout.strip() == f"XLA_FLAGS={flags}"


def test_prmim_xla_gpu_flags_replaces_the_launchers_gpu_flags(repo):
    env = {"PRMIM_PLATFORM": "cuda", "PRMIM_XLA_GPU_FLAGS": ""}
    assert printed(launch(repo, "local.sh", "--skip_setup", "--dry_run", "configs/tiny.py", "wd", env=env)) == [
        main_command(f"{repo}/.venv/bin/python", "configs/tiny.py", "wd")
    ]
    env["PRMIM_XLA_GPU_FLAGS"] = "--xla_gpu_enable_triton_gemm=false"
    export, _ = printed(launch(repo, "local.sh", "--skip_setup", "--dry_run", "configs/tiny.py", "wd", env=env))
    assert export == ["export", "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false"]


# An ldconfig -p that lists the libraries in $LIBRARIES (space-separated), as the dynamic linker's cache would.
FAKE_LDCONFIG = """#!/bin/sh
echo "2 libs found in cache /etc/ld.so.cache"
for path in $LIBRARIES; do printf '\\t%s (libc6,x86-64) => %s\\n' "${path##*/}" "$path"; done
exit "${LDCONFIG_STATUS:-0}"
"""


def tcmalloc_environment(tmp_path, *names, **env):
    """Fake libraries named ``names`` in tmp_path/lib, listed by a fake ldconfig on $PATH; launcher variables ``env``."""
    libraries = [tmp_path / "lib" / name for name in names]
    for library in libraries:
        library.parent.mkdir(exist_ok=True)
        library.write_text("")
    executable(tmp_path / "bin" / "ldconfig", FAKE_LDCONFIG)
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    return {"PATH": path, "LIBRARIES": " ".join(map(str, libraries)), "PRMIM_PLATFORM": "cpu", **env}


def test_local_on_cpu_preloads_the_tcmalloc_ldconfig_lists_after_the_set_up_and_before_the_users_preload(
    repo, tmp_path
):
    env = tcmalloc_environment(
        tmp_path, "libtcmalloc_minimal_debug.so.4", "libtcmalloc_minimal.so.4", PRMIM_TCMALLOC="", LD_PRELOAD="/my.so"
    )
    setup, export, main = printed(launch(repo, "local.sh", "--dry_run", "configs/tiny.py", "wd", env=env))
    assert setup == ["bash", f"{repo}/launch/setup_env.sh", "cpu"]  # which installs it: looked up after
    assert export == ["export", f"LD_PRELOAD={tmp_path}/lib/libtcmalloc_minimal.so.4 /my.so"]
    assert main == main_command(f"{repo}/.venv/bin/python", "configs/tiny.py", "wd")


@pytest.mark.parametrize("setting", ["", "1"])
def test_local_with_several_processes_preloads_tcmalloc_for_all_of_them(repo, tmp_path, setting):
    env = tcmalloc_environment(tmp_path, "libtcmalloc_minimal.so.4", PRMIM_TCMALLOC=setting)
    args = ["--skip_setup", "--processes=2", "--dry_run", "configs/tiny.py", "wd"]
    commands = printed(launch(repo, "local.sh", *args, env=env))
    assert commands[0] == ["export", f"LD_PRELOAD={tmp_path}/lib/libtcmalloc_minimal.so.4"]
    assert len(commands) == 5  # the export, mkdir, two processes, wait


def test_prmim_tcmalloc_names_the_library_to_preload(repo, tmp_path):
    library = tmp_path / "my" / "libtcmalloc.so.4"
    env = tcmalloc_environment(tmp_path, "libtcmalloc_minimal.so.4", PRMIM_TCMALLOC=str(library))
    library.parent.mkdir()
    library.write_text("")
    export, _ = printed(launch(repo, "local.sh", "--skip_setup", "--dry_run", "configs/tiny.py", "wd", env=env))
    assert export == ["export", f"LD_PRELOAD={library}"]


@pytest.mark.parametrize("setting", ["0", "false", "no"])
def test_prmim_tcmalloc_0_turns_the_preload_off_quietly(repo, tmp_path, setting):
    env = tcmalloc_environment(tmp_path, "libtcmalloc_minimal.so.4", PRMIM_TCMALLOC=setting)
    result = launch(repo, "local.sh", "--skip_setup", "--dry_run", "configs/tiny.py", "wd", env=env)
    assert printed(result) == [main_command(f"{repo}/.venv/bin/python", "configs/tiny.py", "wd")]
    assert "tcmalloc" not in result.stderr


@pytest.mark.parametrize(("listed", "status"), [((), "0"), (("libtcmalloc_minimal_debug.so.4",), "0"), ((), "1")])
def test_local_without_tcmalloc_runs_with_glibc_malloc_and_says_so(repo, tmp_path, listed, status):
    env = tcmalloc_environment(tmp_path, *listed, PRMIM_TCMALLOC="", LDCONFIG_STATUS=status)
    result = launch(repo, "local.sh", "--skip_setup", "--dry_run", "configs/tiny.py", "wd", env=env)
    assert printed(result) == [main_command(f"{repo}/.venv/bin/python", "configs/tiny.py", "wd")]
    assert "tcmalloc not found" in result.stderr
    assert "PRMIM_TCMALLOC=0" in result.stderr


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_local_preloads_tcmalloc_on_cpu_only(repo, tmp_path, platform):
    env = tcmalloc_environment(tmp_path, "libtcmalloc_minimal.so.4", PRMIM_TCMALLOC="", PRMIM_PLATFORM=platform)
    env["PRMIM_XLA_GPU_FLAGS"] = ""
    result = launch(repo, "local.sh", "--skip_setup", "--dry_run", "configs/tiny.py", "wd", env=env)
    assert printed(result) == [main_command(f"{repo}/.venv/bin/python", "configs/tiny.py", "wd")]
    assert "tcmalloc" not in result.stderr


def test_local_runs_main_with_tcmalloc_preloaded(repo, tmp_path):
    executable(repo / ".venv" / "bin" / "python", '#!/bin/sh\necho "LD_PRELOAD=$LD_PRELOAD"\n')
    env = tcmalloc_environment(tmp_path, "libtcmalloc_minimal.so.4", PRMIM_TCMALLOC="")
    result = launch(repo, "local.sh", "--skip_setup", "configs/tiny.py", "wd", env=env)
    assert result.returncode == 0, result.stderr
    # The fake library is no shared object: the dynamic linker says so on stderr and goes on without it.
    assert result.stdout.strip() == f"LD_PRELOAD={tmp_path}/lib/libtcmalloc_minimal.so.4"
    assert f"+ export LD_PRELOAD={tmp_path}/lib/libtcmalloc_minimal.so.4" in result.stderr


def test_prmim_tcmalloc_naming_no_file_is_a_usage_error_before_the_set_up(repo, tmp_path):
    env = {"PRMIM_PLATFORM": "cpu", "PRMIM_TCMALLOC": str(tmp_path / "none.so")}
    result = launch(repo, "local.sh", "configs/tiny.py", "wd", env=env)
    assert result.returncode == 2
    assert f"PRMIM_TCMALLOC names no file: {tmp_path}/none.so" in result.stderr
    assert "setup_env" not in result.stderr


# The failing process waits until every process has written its log line, so that none is stopped unstarted.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$@"
for arg in "$@"; do
  [ "${previous:-}" = --process_id ] && id="$arg"
  [ "${previous:-}" = --num_processes ] && count="$arg"
  previous="$arg"
done
if [ "$id" = "${FAIL_ID:-none}" ]; then
  for ((i = 0; i < count; i++)); do until [ -s "wd/logs/process_$i.log" ]; do sleep 0.02; done; done
  exit 3
fi
[ "${FAIL_ID:-none}" = none ] && exit 0
exec sleep 20  # a healthy process stays until the script stops it
"""


@pytest.mark.parametrize(("fail_id", "returncode"), [(None, 0), ("1", 3)])
def test_local_processes_all_run_and_one_failure_fails_the_launch(repo, fail_id, returncode):
    executable(repo / ".venv" / "bin" / "python", FAKE_PYTHON)
    env = {"FAIL_ID": fail_id} if fail_id else {}
    result = launch(repo, "local.sh", "--skip_setup", "--processes", "3", "configs/tiny.py", "wd", env=env)
    assert result.returncode == returncode, result.stderr
    for i in range(3):
        log = (repo / "wd" / "logs" / f"process_{i}.log").read_text()
        assert f"--num_processes 3 --process_id {i}" in log
    if fail_id:
        assert "process 1 failed first (status 3)" in result.stderr


# A training process as the launcher sees it: $BEHAVIOUR_<process id> says what it does. It says "started" only
# once its signal handling is in place, and the failing one waits for both to have started, so the order in which
# the processes end never depends on how fast the machine starts them.
#   fail:  prints its own failure line and traceback once both processes started, exits 1
#   abort: aborts with a C++ stack when its peer's failure reaches it (the launcher's SIGTERM here, JAX's
#          coordination service in a real run), so it always ends after the peer that took it down
#   save:  saves for $SAVE_SECONDS (1 by default) on SIGTERM, then exits 0
#   stuck: notes each SIGTERM in its log ("got SIGTERM") and runs on, for 60 s at most
STAGED_PYTHON = """#!/usr/bin/env bash
for arg in "$@"; do [ "${previous:-}" = --process_id ] && id="$arg"; previous="$arg"; done
behaviour="BEHAVIOUR_$id"
case "${!behaviour}" in
  abort)
    trap 'echo "F0000 coordination_service_agent.cc] Terminating process: a peer died"
          echo "Fatal Python error: Aborted"; exit 134' TERM ;;
  save) trap 'sleep "${SAVE_SECONDS:-1}"; echo saved; exit 0' TERM ;;
  stuck) trap 'echo "got SIGTERM"' TERM ;;
esac
echo "started $$"
case "${!behaviour}" in
  fail)
    for i in 0 1; do until grep -qs started "wd/logs/process_$i.log"; do sleep 0.02; done; done
    echo "process $id of 2 failed: OSError: image file is truncated: /data/train/bad.jpg"
    echo "Traceback (most recent call last):"
    echo "  File \"prmim_jax/data/transforms.py\", line 259, in map"
    echo "OSError: image file is truncated: /data/train/bad.jpg"
    exit 1 ;;
  stuck) end=$((SECONDS + 60)); while [ "$SECONDS" -lt "$end" ]; do sleep 0.05; done ;;
  *) while :; do sleep 0.05; done ;;
esac
"""


def start_local(repo, *args, env=None):
    """``launch/local.sh --skip_setup --processes 2`` in the background, with ``STAGED_PYTHON`` as python."""
    executable(repo / ".venv" / "bin" / "python", STAGED_PYTHON)
    environ = {key: value for key, value in os.environ.items() if key not in CLEARED} | DEFAULTS
    environ.update(env or {})
    # A shell started in the background (pytest run with '&' without job control) inherits SIGINT ignored, and
    # bash cannot trap a signal ignored on entry: coreutils' env hands the launcher SIGINT as a terminal would.
    command = ["env", "--default-signal=INT", BASH, "launch/local.sh", "--skip_setup", "--processes", "2"]
    command += [*args, "configs/tiny.py", "wd"]
    return subprocess.Popen(command, cwd=repo, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_logs(repo, launcher, text):
    """Waits until both processes of a ``start_local`` run have logged ``text``; fails if the launcher ends first."""
    logs = [repo / "wd" / "logs" / f"process_{i}.log" for i in (0, 1)]
    deadline = time.monotonic() + 20
    while not all(log.exists() and text in log.read_text() for log in logs):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.02)


def wait_until_started(repo, launcher):
    wait_for_logs(repo, launcher, "started")


def test_local_shows_the_first_failing_process_own_error_not_the_abort_of_the_peer_it_took_down(repo):
    launcher = start_local(repo, env={"BEHAVIOUR_0": "abort", "BEHAVIOUR_1": "fail"})
    _, stderr = launcher.communicate(timeout=30)
    assert launcher.returncode == 1, stderr  # the first failure's status
    assert "process 1 failed first (status 1)" in stderr
    assert "process 1 of 2 failed: OSError: image file is truncated: /data/train/bad.jpg" in stderr
    assert stderr.rstrip().count("OSError: image file is truncated") == 2  # the line, and the traceback's end
    assert "Fatal Python error" not in stderr
    assert "process 0 exited with status 134, killed by SIGABRT after process 1 failed" in stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_local_passes_a_stop_signal_on_as_sigterm_and_waits_for_the_processes_to_save(repo, signum):
    launcher = start_local(repo, env={"BEHAVIOUR_0": "save", "BEHAVIOUR_1": "save"})
    wait_until_started(repo, launcher)
    sent = time.monotonic()
    launcher.send_signal(signum)
    _, stderr = launcher.communicate(timeout=30)
    assert time.monotonic() - sent >= 1  # it waited for the processes' one-second save
    assert launcher.returncode == 0, stderr
    assert "stopped cleanly" in stderr
    for i in (0, 1):
        assert (repo / "wd" / "logs" / f"process_{i}.log").read_text().splitlines()[-1] == "saved"


def test_local_kills_processes_still_running_after_the_grace_period(repo):
    # Process 0 saves at once and process 1 never ends: a grace period three seconds longer than the save keeps
    # the order of their ends out of the machine's hands (a 1-s save against a 1-s grace raced: both were killed).
    env = {"BEHAVIOUR_0": "save", "SAVE_SECONDS": "0", "BEHAVIOUR_1": "stuck"}
    launcher = start_local(repo, "--grace", "3", env=env)
    wait_until_started(repo, launcher)
    sent = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=30)
    assert 3 <= time.monotonic() - sent < 15
    assert launcher.returncode == 128 + signal.SIGKILL, stderr
    assert "at the end of the grace period; killing them (SIGKILL)" in stderr
    assert "process 1 failed first (status 137, killed by SIGKILL, sent by this script)" in stderr


def test_local_gives_the_others_10_seconds_not_the_grace_period_after_one_failed(repo):
    launcher = start_local(repo, env={"BEHAVIOUR_0": "stuck", "BEHAVIOUR_1": "fail"})  # --grace stays 120
    started = time.monotonic()
    _, stderr = launcher.communicate(timeout=60)
    assert 10 <= time.monotonic() - started < 20  # with a process gone, the others can save nothing more
    assert launcher.returncode == 1, stderr
    assert "process 0 exited with status 137, killed by SIGKILL after process 1 failed" in stderr


def parent_of(pid: int) -> int:
    """The process id of ``pid``'s parent, from /proc."""
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # after the name, which may hold spaces and parentheses


def staged_pid(repo, process: int) -> int:
    """The pid of process ``process`` of a ``start_local`` run, from its "started PID" line."""
    log = (repo / "wd" / "logs" / f"process_{process}.log").read_text()
    return int(re.search(r"^started (\d+)$", log, flags=re.M)[1])


def test_local_does_not_hang_when_a_watcher_of_its_processes_is_killed(repo):
    launcher = start_local(repo, env={"BEHAVIOUR_0": "stuck", "BEHAVIOUR_1": "stuck"})
    wait_until_started(repo, launcher)
    # Process 0's parent is its watcher, a subshell of the launcher that records the process's end. (Not just any
    # child of the launcher: its wait loop's `sleep 0.1` is one too, and pids wrap, so which comes first is luck.)
    watcher = parent_of(staged_pid(repo, 0))
    assert parent_of(watcher) == launcher.pid
    os.kill(watcher, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 137, stderr  # the lost process counts as killed, and stops the others
    assert "failed first (status 137, killed by SIGKILL)" in stderr


def test_local_second_ctrl_c_kills_the_processes_at_once(repo):
    launcher = start_local(repo, env={"BEHAVIOUR_0": "stuck", "BEHAVIOUR_1": "stuck"})
    wait_until_started(repo, launcher)
    sent = time.monotonic()
    launcher.send_signal(signal.SIGINT)
    # The second Ctrl-C once the first has been handled (its SIGTERM reached both processes), not after a fixed
    # pause: bash runs a trap only when its foreground `sleep` ends, and two signals pending at once run it once.
    wait_for_logs(repo, launcher, "got SIGTERM")
    launcher.send_signal(signal.SIGINT)
    _, stderr = launcher.communicate(timeout=30)
    assert time.monotonic() - sent < 10  # not the 120 s grace period
    assert launcher.returncode == 128 + signal.SIGKILL, stderr
    assert "SIGINT again: killing the processes now" in stderr


# launch/tpu_pod.sh


def test_tpu_copies_the_repository_sets_up_tpu_and_runs_main_on_every_worker(repo):
    result = launch(
        repo,
        "tpu_pod.sh",
        "--tpu",
        "my-pod",
        "--zone",
        "us-central2-b",
        "--project",
        "my-project",
        "--dry_run",
        f"{repo}/configs/tiny.py:runlocal",
        "gs://bucket/run",
        "--config.name=a b",
    )
    pack, copy, setup, train, cleanup = printed(result)
    where = ["--zone=us-central2-b", "--worker=all", "--project=my-project"]
    tarball = pack[pack.index("-czf") + 1]
    assert pack[:3] == ["tar", "-C", str(repo)]
    assert {"--exclude=./.venv", "--exclude=./.git"} <= set(pack)
    assert copy == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-pod:prmim_jax.tar.gz", *where]
    assert setup[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
    assert setup[6:9] == where
    assert setup[9].startswith("--command=")
    assert setup[9].endswith("&& bash prmim_jax/launch/setup_env.sh tpu")
    assert train[:9] == setup[:9]
    assert shlex.split(train[9].removeprefix("--command=")) == [
        "cd",
        "prmim_jax",
        "&&",
        "echo",
        "$$",
        ">.train.pid",  # the training process's pid (exec keeps it), for stopping it
        "&&",
        "exec",
        *main_command(".venv/bin/python", "configs/tiny.py:runlocal", "gs://bucket/run", "--config.name=a b"),
    ]
    assert cleanup == ["rm", "-f", tarball]


def test_tpu_skip_setup_leaves_the_environment_alone(repo):
    result = launch(
        repo, "tpu_pod.sh", "--tpu=t", "--zone=z", "--skip_setup", "--dry_run", "configs/tiny.py", "gs://b/r"
    )
    setup = printed(result)[2]
    assert "setup_env" not in setup[-1]
    assert "tar -xzf prmim_jax.tar.gz" in setup[-1]


def test_tpu_copy_leaves_out_venv_and_git_and_keeps_the_workers_venv(repo, tmp_path):
    """Runs the printed pack and unpack commands locally, with tmp_path/home as a worker."""
    executable(repo / ".venv" / "bin" / "python", "")
    (repo / ".git").mkdir()
    home = tmp_path / "home"
    (home / "prmim_jax" / ".venv").mkdir(parents=True)
    (home / "prmim_jax" / "stale.py").write_text("")
    result = launch(
        repo,
        "tpu_pod.sh",
        "--tpu",
        "t",
        "--zone",
        "z",
        "--dry_run",
        "configs/tiny.py",
        "gs://b/r",
        env={"TMPDIR": str(home)},
    )
    pack, copy, setup, _, _ = printed(result)
    subprocess.run(pack, check=True)
    shutil.move(copy[5], home / "prmim_jax.tar.gz")
    unpack = setup[-1].removeprefix("--command=").removesuffix(" && bash prmim_jax/launch/setup_env.sh tpu")
    subprocess.run([BASH, "-c", unpack], cwd=home, check=True)
    worker = home / "prmim_jax"
    assert (worker / "configs" / "tiny.py").is_file()
    assert (worker / "launch" / "tpu_pod.sh").is_file()
    assert (worker / ".venv").is_dir()
    assert not (worker / ".venv" / "bin").exists()
    assert not (worker / ".git").exists()
    assert not (worker / "stale.py").exists()
    assert not (home / "prmim_jax.tar.gz").exists()


# A gcloud that plays two TPU workers on this machine: scp copies into $WORKERS/w0 and w1, ssh runs the
# command in both (as --worker=all does) and fails if one does.
FAKE_GCLOUD = """#!/usr/bin/env bash
echo "$*" >>"$GCLOUD_LOG"
case "$4" in
  scp) for worker in "$WORKERS"/w*; do cp "$5" "$worker/${6#*:}"; done ;;
  ssh)
    for arg in "$@"; do case "$arg" in --command=*) command="${arg#--command=}" ;; esac; done
    pids=()
    for worker in "$WORKERS"/w*; do (cd "$worker" && exec bash -c "$command") & pids+=("$!"); done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit "$status" ;;
esac
"""

# The workers' training process: saves for half a second on SIGTERM, then exits 0.
WORKER_PYTHON = """#!/usr/bin/env bash
trap 'sleep 0.5; echo saved >saved; exit 0' TERM
echo started >started
while :; do sleep 0.05; done
"""


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (a bash trap set), from /proc/PID/status's SigCgt."""
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, flags=re.M)[1], 16) >> (signum - 1) & 1)


def test_tpu_sigterm_reaches_the_training_process_on_every_worker_which_saves_before_the_script_exits(repo, tmp_path):
    executable(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
    workers = [tmp_path / "workers" / f"w{i}" for i in (0, 1)]
    for worker in workers:
        executable(worker / "prmim_jax" / ".venv" / "bin" / "python", WORKER_PYTHON)
    environ = {key: value for key, value in os.environ.items() if key not in CLEARED}
    environ |= {
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "WORKERS": str(tmp_path / "workers"),
        "GCLOUD_LOG": str(tmp_path / "gcloud.log"),
    }
    command = [BASH, "launch/tpu_pod.sh", "--tpu=t", "--zone=z", "--skip_setup", "configs/tiny.py", "gs://b/r"]
    launcher = subprocess.Popen(
        command, cwd=repo, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 20
    # The workers may start before the launcher has set its SIGTERM trap (right after starting them in the
    # background): wait for both.
    while not (
        all((worker / "prmim_jax" / "started").exists() for worker in workers) and catches(launcher.pid, signal.SIGTERM)
    ):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.02)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=30)
    assert launcher.returncode == 0, stderr
    assert all((worker / "prmim_jax" / "saved").exists() for worker in workers)
    assert "kill -s TERM $pid" in (tmp_path / "gcloud.log").read_text()


# launch/gpu_slurm.sh


def sbatch_dry_run(result):
    """``(script path, script text, sbatch argv)`` from a dry run's output."""
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(
        r"mkdir -p (?P<dir>\S+)\ncat > (?P<path>\S+) <<'PRMIM_SBATCH_EOF'\n(?P<script>.*\n)PRMIM_SBATCH_EOF\n(?P<submit>.*)\n",
        result.stdout,
        flags=re.S,
    )
    assert match, result.stdout
    assert match["path"].startswith(match["dir"] + "/")
    return match["path"], match["script"], shlex.split(match["submit"])


def srun_lines(script):
    return [shlex.split(line) for line in script.splitlines() if line.startswith("srun ")]


def test_slurm_per_gpu_runs_one_task_per_gpu_after_setting_up_each_node(repo):
    result = launch(
        repo,
        "gpu_slurm.sh",
        "--nodes",
        "2",
        "--gpus_per_node",
        "4",
        "--partition",
        "gpu",
        "--time",
        "2:00:00",
        "--dry_run",
        "configs/tiny.py:runlocal",
        "wd",
        "--config.name=a b",
    )
    path, script, submit = sbatch_dry_run(result)
    assert submit == ["sbatch", path]
    assert path.startswith(f"{repo}/wd/slurm/")
    lines = script.splitlines()
    for directive in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=2:00:00"):
        assert f"#SBATCH {directive}" in lines
    assert f"#SBATCH --output={repo}/wd/slurm/%x-%j.out" in lines
    assert f"cd {repo}" in lines
    setup, train = srun_lines(script)
    assert "--ntasks-per-node=1" in setup
    assert setup[-3:] == ["bash", "launch/setup_env.sh", "cuda"]
    assert train[-8:] == main_command(
        f"{repo}/.venv/bin/python", f"{repo}/configs/tiny.py:runlocal", f"{repo}/wd", "--config.name=a b"
    )
    bind = train[train.index("-c") + 1]
    assert "SLURM_LOCALID" in bind
    assert "CUDA_VISIBLE_DEVICES" in bind
    assert not (repo / "wd").exists()


def test_slurm_per_node_runs_one_task_per_node_that_sees_every_gpu(repo):
    result = launch(
        repo,
        "gpu_slurm.sh",
        "--nodes=3",
        "--gpus_per_node=8",
        "--per",
        "node",
        "--dry_run",
        "configs/tiny.py",
        "gs://b/r",
    )
    path, script, _ = sbatch_dry_run(result)
    assert path.startswith(f"{repo}/workdirs/slurm/")  # a URL workdir keeps the job files in the repository
    lines = script.splitlines()
    assert {"#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8"} <= set(lines)
    _, train = srun_lines(script)
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in train[train.index("-c") + 1]
    assert train[-7:] == main_command(f"{repo}/.venv/bin/python", f"{repo}/configs/tiny.py", "gs://b/r")


@pytest.mark.parametrize(
    ("visible", "local_id", "expected"),
    [("2,3,5,6", "2", "5"), (None, "3", "3"), ("7", "3", "7")],
)
def test_slurm_per_gpu_task_sees_only_its_gpu(repo, visible, local_id, expected):
    """Runs the job's binding with SLURM's variables: the I-th allocated GPU, or the one SLURM bound."""
    _, script, _ = sbatch_dry_run(
        launch(repo, "gpu_slurm.sh", "--nodes", "1", "--gpus_per_node", "4", "--dry_run", "configs/tiny.py", "wd")
    )
    _, train = srun_lines(script)
    environ = {key: value for key, value in os.environ.items() if key not in CLEARED}
    environ["SLURM_LOCALID"] = local_id
    if visible:
        environ["CUDA_VISIBLE_DEVICES"] = visible
    shown = subprocess.run(
        [
            BASH,
            "-c",
            train[train.index("-c") + 1],
            "bash",
            BASH,
            "-c",
            'echo "$CUDA_VISIBLE_DEVICES $JAX_LOCAL_DEVICE_IDS"',
        ],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.split() == [expected, "0"]


@pytest.mark.parametrize(("job_flags", "expected_tail"), [(None, ""), ("--xla_dump_to=/d", " --xla_dump_to=/d")])
def test_slurm_job_exports_the_gpu_flags_before_the_jobs_own_xla_flags(repo, job_flags, expected_tail):
    _, script, _ = sbatch_dry_run(
        launch(repo, "gpu_slurm.sh", "--nodes", "1", "--gpus_per_node", "1", "--dry_run", "configs/tiny.py", "wd")
    )
    export = [line for line in script.splitlines() if line.startswith("export XLA_FLAGS=")]
    assert len(export) == 1
    assert script.index(export[0]) < script.index("\nsrun ")
    environ = {key: value for key, value in os.environ.items() if key not in CLEARED}
    if job_flags:
        environ["XLA_FLAGS"] = job_flags
    shown = subprocess.run(
        [BASH, "-c", f'{export[0]}; echo "$XLA_FLAGS"'], env=environ, capture_output=True, text=True, check=True
    )
    assert shown.stdout.strip() == xla_gpu_flags() + expected_tail


@pytest.mark.parametrize(("grace", "expected"), [(None, "120"), ("300", "300")])
def test_slurm_job_sends_sigterm_a_grace_period_before_the_time_limit_and_one_failure_ends_all_tasks(
    repo, grace, expected
):
    args = ["--nodes", "2", "--gpus_per_node", "4", "--time", "1:00:00", *(["--grace", grace] if grace else [])]
    _, script, _ = sbatch_dry_run(launch(repo, "gpu_slurm.sh", *args, "--dry_run", "configs/tiny.py", "wd"))
    assert f"#SBATCH --signal=TERM@{expected}" in script.splitlines()
    _, train = srun_lines(script)
    assert {"--kill-on-bad-exit=1", f"--wait={expected}"} <= set(train[: train.index("bash")])


def test_slurm_writes_the_script_and_submits_it(repo, tmp_path):
    executable(tmp_path / "bin" / "sbatch", '#!/bin/sh\necho "$@" > "$SBATCH_CALL"\necho "Submitted batch job 7"\n')
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SBATCH_CALL": str(tmp_path / "call")}
    args = ["--nodes", "1", "--gpus_per_node", "2", "--skip_setup", "configs/tiny.py", "wd"]
    result = launch(repo, "gpu_slurm.sh", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert "Submitted batch job 7" in result.stdout
    submitted = pathlib.Path((tmp_path / "call").read_text().strip())
    assert submitted.parent == repo / "wd" / "slurm"
    script = submitted.read_text()
    assert "setup_env" not in script
    assert subprocess.run([BASH, "-n", str(submitted)]).returncode == 0
    _, dry_script, _ = sbatch_dry_run(launch(repo, "gpu_slurm.sh", *args, "--dry_run"))
    assert script == dry_script


def test_slurm_sbatch_arg_may_be_given_again_each_one_a_directive_in_order(repo):
    args = ["--nodes", "1", "--gpus_per_node", "1", "--sbatch_arg", "--account=a", "--sbatch_arg=--qos=q"]
    _, script, _ = sbatch_dry_run(launch(repo, "gpu_slurm.sh", *args, "--dry_run", "configs/tiny.py", "wd"))
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH --")]
    assert directives[-2:] == ["#SBATCH --account=a", "#SBATCH --qos=q"]


# All scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    assert subprocess.run([BASH, "-n", str(LAUNCH / script)]).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage_and_runs_nothing(repo, script):
    result = launch(repo, script, "--help")
    assert result.returncode == 0
    assert f"bash launch/{script}" in result.stdout
    assert result.stderr == ""


TPU = ("--tpu", "t", "--zone", "z")
SLURM = ("--nodes", "1", "--gpus_per_node", "1")


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("local.sh", (), "missing CONFIG and WORKDIR"),
        ("local.sh", ("configs/tiny.py",), "missing WORKDIR"),
        ("local.sh", ("configs/none.py:arg", "wd"), "config file not found: configs/none.py"),
        ("local.sh", ("--processes", "0", "configs/tiny.py", "wd"), "--processes must be a positive integer"),
        ("local.sh", ("--processes", "two", "configs/tiny.py", "wd"), "--processes must be a positive integer"),
        ("local.sh", ("configs/tiny.py", "wd", "--processes"), "--processes needs a value"),
        ("local.sh", ("--config.x=1", "configs/tiny.py", "wd"), "unknown option '--config.x=1'"),
        ("local.sh", ("--processes", "2", "configs/tiny.py", "gs://b/r"), "must be a local path"),
        ("local.sh", ("--grace", "0", "configs/tiny.py", "wd"), "--grace must be a positive number of seconds"),
        ("tpu_pod.sh", (*TPU, "--grace", "soon", "configs/tiny.py", "gs://b/r"), "--grace must be a positive"),
        ("gpu_slurm.sh", (*SLURM, "--grace=-1", "configs/tiny.py", "wd"), "--grace must be a positive"),
        ("tpu_pod.sh", ("--zone", "z", "configs/tiny.py", "gs://b/r"), "missing --tpu NAME"),
        ("tpu_pod.sh", ("--tpu", "t", "configs/tiny.py", "gs://b/r"), "missing --zone ZONE"),
        ("tpu_pod.sh", (*TPU, "configs/tiny.py"), "missing WORKDIR"),
        ("tpu_pod.sh", (*TPU, "configs/none.py", "gs://b/r"), "config file not found"),
        ("tpu_pod.sh", (*TPU, "OUTSIDE", "gs://b/r"), "CONFIG must be inside the repository"),
        ("gpu_slurm.sh", ("--gpus_per_node", "1", "configs/tiny.py", "wd"), "missing --nodes N"),
        (
            "gpu_slurm.sh",
            ("--nodes", "0", "--gpus_per_node", "1", "configs/tiny.py", "wd"),
            "--nodes must be a positive integer",
        ),
        (
            "gpu_slurm.sh",
            ("--nodes", "two", "--gpus_per_node", "1", "configs/tiny.py", "wd"),
            "--nodes must be a positive integer",
        ),
        ("gpu_slurm.sh", ("--nodes", "1", "configs/tiny.py", "wd"), "missing --gpus_per_node G"),
        ("gpu_slurm.sh", (*SLURM, "--per", "core", "configs/tiny.py", "wd"), "--per must be gpu or node"),
        ("gpu_slurm.sh", (*SLURM, "configs/tiny.py"), "missing WORKDIR"),
        ("gpu_slurm.sh", (*SLURM, "configs/none.py", "wd"), "config file not found"),
    ],
)
def test_usage_errors_exit_nonzero_with_a_message(repo, tmp_path, script, args, message):
    outside = tmp_path / "outside.py"  # a config the TPU workers would not get
    outside.write_text("")
    args = [str(outside) if arg == "OUTSIDE" else arg for arg in args]
    result = launch(repo, script, "--dry_run", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "usage: bash launch/" in result.stderr
    assert result.stdout == ""


def test_bad_platform_is_a_usage_error(repo):
    result = launch(repo, "local.sh", "--dry_run", "configs/tiny.py", "wd", env={"PRMIM_PLATFORM": "rocm"})
    assert result.returncode == 2
    assert "PRMIM_PLATFORM must be cpu, cuda or tpu" in result.stderr


# launch/lib.sh's parse_arguments, for a launcher with one option that takes a value (--count) and one that
# may be given again (--name).
PARSE = """set -euo pipefail
prog=launcher
usage="usage: launcher [--count N] [--name NAME]... CONFIG WORKDIR"
source "$LIB"
count=1
names=()
value_options=(--count=count "--name=names[]")
parse_arguments "$@"
for variable in dry_run skip_setup count; do join "$variable" "${!variable}"; done
join names ${names[@]+"${names[@]}"}
join positional ${positional[@]+"${positional[@]}"}
join extra ${extra[@]+"${extra[@]}"}
"""


def parse(*args, env=None):
    """``{variable: [values]}`` as parse_arguments sets them for ``args``, or the failed run."""
    environ = {key: value for key, value in os.environ.items() if key not in CLEARED}
    environ |= {"LIB": str(LAUNCH / "lib.sh"), **(env or {})}
    result = subprocess.run([BASH, "-c", PARSE, "launcher", *args], env=environ, capture_output=True, text=True)
    if result.returncode != 0:
        return result
    return {name: values for name, *values in map(shlex.split, result.stdout.splitlines())}


def test_parse_arguments_takes_a_value_as_the_next_argument_or_after_an_equals_sign():
    assert parse("--count", "3", "c", "w")["count"] == ["3"]
    assert parse("--count=3", "c", "w")["count"] == ["3"]
    assert parse("--count=a=b", "c", "w")["count"] == ["a=b"]
    assert parse("--count=", "c", "w")["count"] == [""]  # the launcher's own check says what is wrong with it
    assert parse("--count", "--dry_run", "c", "w")["count"] == ["--dry_run"]  # a value, whatever it looks like
    assert parse("c", "w")["count"] == ["1"]  # the launcher's default


def test_parse_arguments_appends_each_value_of_an_option_given_again():
    assert parse("--name", "a b", "c", "--name=b", "w")["names"] == ["a b", "b"]
    assert parse("c", "w")["names"] == []


def test_parse_arguments_takes_launch_options_anywhere_before_dashes_and_passes_the_rest_to_main():
    parsed = parse("c", "--count", "2", "w", "--flag=1", "x", "--skip_setup", "--", "--count=5", "--dry_run")
    assert parsed == {
        "dry_run": ["0"],
        "skip_setup": ["1"],
        "count": ["2"],
        "names": [],
        "positional": ["c", "w"],
        "extra": ["--flag=1", "x", "--count=5", "--dry_run"],
    }
    assert parse("--", "--odd", "-w")["positional"] == ["--odd", "-w"]  # after `--`, CONFIG may start with -


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (("--dry_run",), {}, "1"),
        (("--dry-run",), {}, "1"),
        ((), {"DRY_RUN": "1"}, "1"),
        ((), {"DRY_RUN": "yes"}, "1"),
        ((), {"DRY_RUN": "0"}, "0"),
        ((), {"DRY_RUN": "false"}, "0"),
        ((), {"DRY_RUN": "no"}, "0"),
        ((), {"DRY_RUN": ""}, "0"),
        ((), {}, "0"),
    ],
)
def test_parse_arguments_dry_run_is_the_option_or_dry_run_set_to_anything_but_0_false_no(args, env, expected):
    assert parse(*args, "c", "w", env=env)["dry_run"] == [expected]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--count",), "--count needs a value"),
        (("--name",), "--name needs a value"),
        (("--colour=red", "c", "w"), "unknown option '--colour=red' (main.py flags go after CONFIG WORKDIR)"),
        (("c", "--counts", "w"), "unknown option '--counts' (main.py flags go after CONFIG WORKDIR)"),
    ],
)
def test_parse_arguments_usage_errors_exit_2_with_the_message_and_usage(args, message):
    result = parse(*args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"launcher: error: {message}",
        "usage: launcher [--count N] [--name NAME]... CONFIG WORKDIR",
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_the_scripts_header_comment(repo, script):
    text = (LAUNCH / script).read_text()
    header = text[text.index("\n") + 1 : text.index("\nset -euo pipefail")].splitlines()
    expected = [line.removeprefix("#").removeprefix(" ") for line in header]
    for option in ("-h", "--help"):
        assert launch(repo, script, option, "configs/tiny.py", "wd").stdout.splitlines() == expected
