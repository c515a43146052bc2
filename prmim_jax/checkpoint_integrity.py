"""A checkpoint step's integrity: its checksums, and the setting aside of a damaged step.

``WORKDIR/checkpoints/<step>/checksums.json`` holds the size and sha256 of every
file of the step (``prmim_jax.checkpoint`` writes it just before the step's
directory appears, and checks it before restoring)::

    {"format": 1, "step": 6, "process_count": 2,
     "files": {"state/_METADATA": {"bytes": 60632, "sha256": "..."}, ...}}

Two files at the top of a step are not covered: orbax rewrites
``_CHECKPOINT_METADATA`` and writes ``commit_success.txt`` after the checksums.
A damaged step is renamed ``<step>.corrupt`` (``set_aside``), never deleted.

Cost: sha256 runs at one to two GB/s on one core
(``benchmarks/results/design_choices_cpu.md``, "sha256"), so a ViT-B state with
Adam moments (~1.3 GB) costs about a second in the background thread at every
save, and once more when a run resumes (process 0 reads every file; other processes
wait). Files are read back from the file system, so on network storage the
read-back costs what one restore costs.
"""

from __future__ import annotations

import hashlib
import json
import os

from etils import epath

CHECKSUMS = "checksums.json"
SET_ASIDE_SUFFIX = ".corrupt"
# Written by orbax after the post-finalization callback has hashed the step (see the module docstring).
_WRITTEN_AFTER_CHECKSUMS = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt", CHECKSUMS})


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)  # releases the GIL: the train loop keeps running
    return digest.hexdigest()


def _files(step_dir: epath.Path) -> list[str]:
    """Paths (relative, '/'-separated) of the files in ``step_dir`` that ``checksums.json`` covers."""
    names = []
    for folder, _, files in step_dir.walk():
        names += [(epath.Path(folder) / f).relative_to(step_dir).as_posix() for f in files]
    return sorted(n for n in names if n not in _WRITTEN_AFTER_CHECKSUMS)


def write_checksums(step_dir: str | os.PathLike, step: int, process_count: int) -> None:
    """Writes ``step_dir/checksums.json``: size and sha256 of every file now in ``step_dir`` (written whole
    under a temporary name, then renamed, so a reader sees the old file or the new one)."""
    step_dir = epath.Path(step_dir)
    files = {}
    for name in _files(step_dir):
        path = step_dir / name
        files[name] = {"bytes": path.stat().length, "sha256": _sha256(path)}
    manifest = {"format": 1, "step": step, "process_count": process_count, "files": files}
    partial = step_dir / f"{CHECKSUMS}.partial"
    partial.write_text(json.dumps(manifest, indent=1))
    partial.replace(step_dir / CHECKSUMS)


def verify_checksums(step_dir: str | os.PathLike) -> tuple[dict | None, list[str]]:
    """``(manifest, problems)`` of ``step_dir`` against its ``checksums.json``.

    ``manifest`` is ``None`` for an unverified step (no ``checksums.json``; ``problems`` is then empty).
    Each problem names a file relative to ``step_dir`` and what is wrong with it: missing,
    truncated (bytes found of bytes saved), grown, changed content (checksum mismatch), unreadable.
    """
    step_dir = epath.Path(step_dir)
    if not (step_dir / CHECKSUMS).exists():
        return None, []
    try:
        manifest = json.loads((step_dir / CHECKSUMS).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return {}, [f"{CHECKSUMS} is unreadable ({type(error).__name__}: {error})"]
    problems = []
    for name, saved in files.items():
        path = step_dir / name
        try:
            if not path.exists():
                problems.append(f"{name} is missing")
                continue
            size = path.stat().length
            if size < saved["bytes"]:
                problems.append(f"{name} is truncated ({size} of {saved['bytes']} bytes)")
            elif size > saved["bytes"]:
                problems.append(f"{name} has grown ({size} bytes, {saved['bytes']} saved)")
            elif _sha256(path) != saved["sha256"]:
                problems.append(f"{name} has changed (sha256 mismatch, same size)")
        except OSError as error:
            problems.append(f"{name} is unreadable ({type(error).__name__}: {error})")
    return manifest, problems


def summary(problems: list[str], shown: int = 3) -> str:
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; and {more} more" if more > 0 else "")


def set_aside(step_dir: epath.Path) -> epath.Path:
    """Renames a damaged ``step_dir`` to ``<step>.corrupt`` (``.corrupt-2``, ... when taken); returns the new path."""
    target = step_dir.parent / (step_dir.name + SET_ASIDE_SUFFIX)
    copy = 1
    while target.exists():
        copy += 1
        target = step_dir.parent / f"{step_dir.name}{SET_ASIDE_SUFFIX}-{copy}"
    step_dir.rename(target)
    return target
