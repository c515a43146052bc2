"""Checkpoint integrity: every saved step carries checksums of its files; a damaged step is named, moved
aside and replaced by the newest good one (on every process alike); a run never restarts over its own
damaged checkpoints; readers read runs of any number of processes; a failed asynchronous save stops the
run at the next step with one message."""

import dataclasses
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import tensorstore as ts
from conftest import free_port, load_run, xla_flags
from test_train import losses_by_step, read_metrics, tiny_config

from prmim_jax import checkpoint, checkpoint_integrity, loop, train

ROOT = pathlib.Path(__file__).parent.parent


def run_config():
    config = tiny_config(total_steps=4, checkpoint_every=2)
    config.evals = ml_collections.ConfigDict()  # checkpoints are the subject; evaluations only cost time
    return config


@dataclasses.dataclass
class SavedRun:
    """A 4-step run with checkpoints at steps 2 and 4, and what each checkpoint holds."""

    workdir: pathlib.Path
    boxed_state: object
    shardings: object
    states: dict  # step -> train state (numpy)


class RecordingIterator:
    def set_state(self, state):
        self.state = state


def resume(run: SavedRun, workdir: pathlib.Path, state_of=None):
    """``(start step, state as numpy, data-iterator state)`` as the trainer resumes ``workdir``;
    ``state_of`` is another run's ``(boxed_state, shardings)``."""
    boxed_state, shardings = state_of or (run.boxed_state, run.shardings)
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints")
    iterator = RecordingIterator()
    try:
        state, start = loop.restore_or_create(checkpointer, boxed_state, shardings, iterator, lambda: None)
    finally:
        checkpointer.close()
    return start, jax.device_get(state), getattr(iterator, "state", None)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> SavedRun:
    workdir = tmp_path_factory.mktemp("run")
    config = run_config()
    train.train_and_evaluate(config, str(workdir))
    setup = train.validate(config)
    _, boxed_state, shardings = train.abstract_state(setup, config, jax.random.key(0))
    run = SavedRun(workdir, boxed_state, shardings, {})
    for step in (2, 4):
        checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", read_only=True)
        abstract = jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), nn.unbox(boxed_state), shardings
        )
        run.states[step] = jax.device_get(checkpointer.restore_latest(abstract, step)[1])
        checkpointer.close()
    return run


@pytest.fixture
def copy(saved_run, tmp_path) -> pathlib.Path:
    """A copy of the saved run's workdir to damage."""
    return pathlib.Path(shutil.copytree(saved_run.workdir, tmp_path / "run"))


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def checkpoint_dirs(workdir: pathlib.Path) -> list[str]:
    return sorted(os.listdir(workdir / "checkpoints"))


# --- damage ---------------------------------------------------------------------------------------


def array_chunk(state_dir: pathlib.Path, key: str) -> tuple[pathlib.Path, int, int]:
    """``(file, offset, length)`` of the stored bytes of one array chunk (an OCDBT key such as
    ``params.encoder.transformer.block_0.mlp.fc1.kernel/3.0``), read from OCDBT's own b-tree."""
    base = ts.KvStore.open(f"file://{state_dir}/").result()
    root = ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]
    for entry in ts.ocdbt.dump(base, root).result()["entries"]:
        if entry["key"] == key.encode():
            _, prefix, rest = entry["indirect_value"].split(":", 2)  # value:<prefix>:<file>:<offset>:<length>
            name, offset, length = rest.rsplit(":", 2)
            return state_dir / prefix / name, int(offset), int(length)
    raise KeyError(key)


PARAMS_CHUNK = "params.encoder.transformer.block_0.mlp.fc1.kernel/3.0"
ADAM_MU_CHUNK = "opt_state.0.mu.encoder.transformer.block_0.mlp.fc1.kernel/3.0"
ITERATOR_FILE = "data/process_0-of-1.json"


def flip_8_bytes(step_dir: pathlib.Path, key: str) -> None:
    """Inverts 8 bytes in the middle of one array chunk: zstd (no content checksum) still decodes it,
    into other values."""
    path, offset, length = array_chunk(step_dir / "state", key)
    data = bytearray(path.read_bytes())
    middle = offset + length // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def truncate_array_file(step_dir):
    path, offset, length = array_chunk(step_dir / "state", PARAMS_CHUNK)
    os.truncate(path, offset + length // 2)


def move_iterator_forward(step_dir):
    path = step_dir / ITERATOR_FILE
    assert json.loads(path.read_text()) == {"next_index": 4}
    path.write_text(path.read_text().replace("4", "6"))  # still valid JSON: a silently wrong data position


# (damage, what the warning says is wrong)
DAMAGES = {
    "truncated array file": (truncate_array_file, r"state/ocdbt\.process_0/d/\w+ is truncated \(\d+ of \d+ bytes\)"),
    "deleted _METADATA": (lambda d: (d / "state/_METADATA").unlink(), r"state/_METADATA is missing"),
    "deleted iterator file": (lambda d: (d / ITERATOR_FILE).unlink(), rf"{ITERATOR_FILE} is missing"),
    "empty iterator file": (lambda d: (d / ITERATOR_FILE).write_text(""), rf"{ITERATOR_FILE} is truncated \(0 of"),
    "removed state item": (lambda d: shutil.rmtree(d / "state"), r"state/_METADATA is missing; .* and \d+ more"),
    "8 bytes flipped in parameters": (lambda d: flip_8_bytes(d, PARAMS_CHUNK), r"\w+ has changed \(sha256 mismatch"),
    "8 bytes flipped in Adam moments": (lambda d: flip_8_bytes(d, ADAM_MU_CHUNK), r"\w+ has changed \(sha256 mismatch"),
    "iterator position changed": (move_iterator_forward, rf"{ITERATOR_FILE} has changed \(sha256 mismatch"),
    # Without checksums (a step saved before them) orbax's own error is the sign of damage.
    "no checksums, deleted iterator file": (
        lambda d: [(d / checkpoint_integrity.CHECKSUMS).unlink(), (d / ITERATOR_FILE).unlink()],
        rf"{ITERATOR_FILE} is missing",
    ),
}


def test_every_saved_step_carries_checksums_of_all_its_files(saved_run):
    for step in (2, 4):
        step_dir = saved_run.workdir / "checkpoints" / str(step)
        manifest = json.loads((step_dir / checkpoint_integrity.CHECKSUMS).read_text())
        files = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}
        # Everything but what orbax writes after the step is hashed (see the checkpoint module).
        assert set(manifest["files"]) == files - {
            "_CHECKPOINT_METADATA",
            "commit_success.txt",
            checkpoint_integrity.CHECKSUMS,
        }
        assert {ITERATOR_FILE, "state/_METADATA"} <= set(manifest["files"])
        assert manifest["step"] == step and manifest["process_count"] == 1
        assert checkpoint_integrity.verify_checksums(step_dir) == (manifest, [])
    assert checkpoint_dirs(saved_run.workdir) == ["2", "4"]  # no temporary or partial files left


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_step_is_moved_aside_and_the_previous_step_restored(saved_run, copy, caplog, damage):
    damage_fn, what = DAMAGES[damage]
    damage_fn(copy / "checkpoints/4")
    with caplog.at_level(logging.WARNING, logger="prmim_jax"):
        start, state, data_state = resume(saved_run, copy)
    assert start == 2 and data_state == {"next_index": 2}
    assert_trees_equal(state, saved_run.states[2])
    assert checkpoint_dirs(copy) == ["2", "4.corrupt"]  # kept, under a name orbax ignores
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"{copy / 'checkpoints/4'} is damaged (")
    assert re.search(what, warning), warning
    assert warning.endswith("moved it aside to 4.corrupt (not deleted) and resumed from step 2")
    assert "processes" not in warning


def test_flipped_bytes_restore_silently_wrong_values_without_checksums(saved_run, copy):
    # Why checksums: orbax alone restores the flipped chunk as other numbers, with no error.
    (copy / "checkpoints/4" / checkpoint_integrity.CHECKSUMS).unlink()
    flip_8_bytes(copy / "checkpoints/4", ADAM_MU_CHUNK)
    start, state, _ = resume(saved_run, copy)
    assert start == 4
    mu, saved_mu = (
        s.opt_state[0].mu["encoder"]["transformer"]["block_0"]["mlp"]["fc1"] for s in (state, saved_run.states[4])
    )
    assert not np.array_equal(mu["kernel"], saved_mu["kernel"])
    assert_trees_equal(state.params, saved_run.states[4].params)


def test_a_run_resumed_after_damage_retrains_the_lost_steps_exactly(saved_run, copy, capsys):
    flip_8_bytes(copy / "checkpoints/4", ADAM_MU_CHUNK)
    logged_before = len(read_metrics(copy))
    result = train.train_and_evaluate(run_config(), str(copy))
    assert result["step"] == 4
    assert "resumed from step 2" in capsys.readouterr().out
    retrained = {row["step"]: row["loss"] for row in read_metrics(copy)[logged_before:] if "loss" in row}
    assert retrained == {s: loss for s, loss in losses_by_step(saved_run.workdir).items() if s > 2}
    assert checkpoint_dirs(copy) == ["2", "4", "4.corrupt"]
    start, state, data_state = resume(saved_run, copy)
    assert start == 4 and data_state == {"next_index": 4}
    assert_trees_equal(state, saved_run.states[4])  # bit-exact, as if nothing had happened


def test_a_run_whose_every_checkpoint_is_damaged_refuses_to_start_over_them(saved_run, copy):
    flip_8_bytes(copy / "checkpoints/2", PARAMS_CHUNK)
    (copy / "checkpoints/4/state/_METADATA").unlink()
    with pytest.raises(checkpoint.CheckpointDamagedError) as raised:
        resume(saved_run, copy)
    message = str(raised.value)
    assert f"{copy / 'checkpoints/4'}: state/_METADATA is missing" in message
    assert f"{copy / 'checkpoints/2'}: state/ocdbt.process_0/d/" in message and "has changed" in message
    assert "nothing was moved or deleted" in message
    assert checkpoint_dirs(copy) == ["2", "4"]


def test_an_intact_checkpoint_of_another_model_is_refused_without_moving_anything(saved_run, copy):
    other = run_config()
    other.model.update(mlp_ratio=2)
    setup = train.validate(other)
    _, boxed_state, shardings = train.abstract_state(setup, other, jax.random.key(0))
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"(?s)checkpoints/4 is intact .*Did the model"):
        resume(saved_run, copy, (boxed_state, shardings))
    assert checkpoint_dirs(copy) == ["2", "4"]


@pytest.mark.parametrize("with_checksums", [True, False], ids=["checksummed", "unverified"])
def test_a_checkpoint_of_two_processes_resumes_only_with_two_but_reads_with_one(saved_run, copy, with_checksums):
    for step in (2, 4):  # make it look as written by two processes
        step_dir = copy / "checkpoints" / str(step)
        (step_dir / ITERATOR_FILE).rename(step_dir / "data/process_0-of-2.json")
        shutil.copy(step_dir / "data/process_0-of-2.json", step_dir / "data/process_1-of-2.json")
        checkpoint_integrity.write_checksums(step_dir, step, process_count=2)
        if not with_checksums:
            (step_dir / checkpoint_integrity.CHECKSUMS).unlink()
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"written by 2 processes, but 1 are resuming"):
        resume(saved_run, copy)
    assert checkpoint_dirs(copy) == ["2", "4"]
    _, _, params, step = load_run(copy)  # readers need no iterator state
    assert step == 4
    assert_trees_equal(params, saved_run.states[4].params)


def test_readers_skip_a_damaged_step_and_leave_it_in_place(saved_run, copy, caplog):
    flip_8_bytes(copy / "checkpoints/4", PARAMS_CHUNK)
    with caplog.at_level(logging.WARNING, logger="prmim_jax"):
        _, _, params, step = load_run(copy)
    assert step == 2
    assert_trees_equal(params, saved_run.states[2].params)
    assert any("is damaged" in r.getMessage() and "read step 2 instead" in r.getMessage() for r in caplog.records)
    assert checkpoint_dirs(copy) == ["2", "4"]
    with pytest.raises(checkpoint.CheckpointDamagedError, match=r"checkpoints/4: .* has changed"):
        load_run(copy, step=4)  # the step asked for, or an error
    with pytest.raises(FileNotFoundError, match=r"has no step 3; its steps are \[2, 4\]"):
        load_run(copy, step=3)


def test_a_step_without_checksums_is_restored_unverified(saved_run, copy):
    (copy / "checkpoints/4" / checkpoint_integrity.CHECKSUMS).unlink()
    start, state, _ = resume(saved_run, copy)
    assert start == 4
    assert_trees_equal(state, saved_run.states[4])


# --- several processes ----------------------------------------------------------------------------

TWO_PROCESS_WORKER = """
import json, sys
sys.path.insert(0, {root!r})
from prmim_jax import distributed
distributed.initialize_distributed({address!r}, 2, {process_id})
import jax, numpy as np
from jax.experimental import multihost_utils
from prmim_jax import checkpoint
mesh = jax.make_mesh((4,), ("data",))  # two devices on each process
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
def state_at(step):
    return {{"w": jax.make_array_from_callback((8, 100), sharding, lambda i: np.full((8, 100), step, np.float32)[i])}}
directory = {directory!r}
checkpointer = checkpoint.Checkpointer(directory)
for step in (1, 2, 3):
    checkpointer.save(step, state_at(step), {{"next_index": 10 * step + jax.process_index()}})
checkpointer.wait()
if jax.process_index() == 0:
    # Step 3: process 1's iterator file emptied (the checksums tell process 0).
    open(f"{{directory}}/3/data/process_1-of-2.json", "w").close()
    # Step 2, unverified: process 1's iterator file deleted (only process 1's restore notices).
    import os
    os.remove(f"{{directory}}/2/checksums.json")
    os.remove(f"{{directory}}/2/data/process_1-of-2.json")
multihost_utils.sync_global_devices("damaged")
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_at(0))
step, state, data = checkpointer.restore_latest(abstract)
checkpointer.close()
print("RESULT", json.dumps({{"step": step, "w": float(state["w"].addressable_data(0)[0, 0]), "data": data}}))
"""


def test_all_processes_fall_back_to_the_same_step_and_one_moves_the_damaged_aside(tmp_path):
    address = f"localhost:{free_port()}"
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                TWO_PROCESS_WORKER.format(
                    root=str(ROOT), address=address, process_id=i, directory=str(tmp_path / "checkpoints")
                ),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    results = [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:]) for out in outputs]
    assert [r["step"] for r in results] == [1, 1] and [r["w"] for r in results] == [1.0, 1.0]
    assert [r["data"] for r in results] == [{"next_index": 10}, {"next_index": 11}]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2.corrupt", "3.corrupt"]
    assert "3 is damaged (data/process_1-of-2.json is truncated (0 of" in outputs[0]
    assert "2 is damaged (data/process_1-of-2.json is missing)" in outputs[0]


# --- kills and failed saves -----------------------------------------------------------------------

SAVING_WORKER = """
import itertools, resource, signal, sys, time
sys.path.insert(0, {root!r})
import jax, numpy as np
from prmim_jax import checkpoint
checkpointer = checkpoint.Checkpointer({directory!r}, keep=2)
state = {{"w": np.random.default_rng(0).normal(size=(20, 25_000)).astype(np.float32)}}
if {file_size_limit}:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
for step in range(1, 7):
    if step == 3 and {file_size_limit}:
        resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, resource.RLIM_INFINITY))
    print("saving", step, flush=True)
    checkpointer.save(step, {{"w": jax.numpy.asarray(state["w"] + step)}}, {{"next_index": step}})
    # Train steps, 20 and then as many as the save still needs (on a loaded machine it may outlast 20), so that
    # the check after a step, not the next save, is what finds a failed save: once the save has ended,
    # check_save raises its error.
    for train_step in itertools.count(1):
        time.sleep(0.01)
        ended = train_step >= 20 and not checkpointer.manager.is_saving_in_progress()
        checkpointer.check_save()
        if ended:
            break
"""


def saving_worker(directory, file_size_limit=0):
    source = SAVING_WORKER.format(root=str(ROOT), directory=str(directory), file_size_limit=file_size_limit)
    return subprocess.Popen(
        [sys.executable, "-c", source],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, XLA_FLAGS=xla_flags(1)),
    )


def restore_small(directory):
    abstract = {
        "w": jax.ShapeDtypeStruct(
            (20, 25_000), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
    }
    checkpointer = checkpoint.Checkpointer(directory)
    try:
        return checkpointer.restore_latest(abstract)
    finally:
        checkpointer.close()


def test_a_kill_during_a_save_leaves_the_previous_step_verified_and_restorable(tmp_path):
    process = saving_worker(tmp_path / "checkpoints")
    for line in process.stdout:
        if line.startswith("saving 3"):  # step 2 is complete, step 3 is being written
            break
    process.kill()
    process.wait()
    step, state, data_state = restore_small(tmp_path / "checkpoints")
    assert step in (2, 3) and data_state == {"next_index": step}
    expected = np.random.default_rng(0).normal(size=(20, 25_000)).astype(np.float32) + step
    np.testing.assert_array_equal(np.asarray(state["w"]), expected)
    assert checkpoint_integrity.verify_checksums(tmp_path / "checkpoints" / str(step))[1] == []


def test_a_failed_save_stops_the_run_at_the_next_step_with_one_message(tmp_path):
    # A real failed write: a file-size limit makes the third save fail with EFBIG (the disk-full message
    # itself is checked below with a patched writer, since a real full disk needs a mount).
    directory, reason = tmp_path / "checkpoints", "EFBIG"
    process = saving_worker(directory, 1_000_000)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output
    saving = [line for line in output.splitlines() if line.startswith("saving")]
    assert saving[-1] == "saving 3"  # stopped by check_save during the train steps after the failed save
    assert f"CheckpointSaveError: saving step 3 to {directory / '3'} failed: " in output
    assert f"({reason})" in output
    assert "Step 2 is the newest complete checkpoint" in output
    # One message: the uncaught CheckpointSaveError (chained to orbax's error) and nothing before it: no
    # "Event loop is closed" tracebacks, no errors logged by orbax's background threads.
    before_the_error = output.split("Traceback (most recent call last)")[0]
    assert before_the_error.splitlines() == saving
    assert "Event loop is closed" not in output


def test_disk_full_message_says_what_the_checkpoint_needs_and_what_was_free(tmp_path, monkeypatch):
    checkpointer = checkpoint.Checkpointer(tmp_path / "checkpoints")
    state = {"w": jax.numpy.zeros((1000, 1000))}
    checkpointer.save(1, state, {"next_index": 1})
    checkpointer.wait()

    def disk_full(self, directory, args):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(checkpoint.IteratorStateHandler, "save", disk_full)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(checkpoint.CheckpointSaveError) as raised:
        checkpointer.save(2, state, {"next_index": 2})
        # Train steps until the save has ended (however long that takes on a loaded machine); check_save after
        # the one that sees it ended raises its error.
        ended = False
        while not ended:
            time.sleep(0.01)
            ended = not checkpointer.manager.is_saving_in_progress()
            checkpointer.check_save()
    error = raised.value
    assert (error.step, error.directory, error.errno) == (2, str(tmp_path / "checkpoints/2"), errno.ENOSPC)
    message = str(error)
    assert "No space left on device (ENOSPC). The checkpoint needs about 4.0 MB; " in message
    assert f"{free / 1e9:.1f} GB was free" in message or "MB was free" in message
    assert "Step 1 is the newest complete checkpoint: free space, then rerun" in message
    checkpointer.close()  # returns: the failure was reported once
