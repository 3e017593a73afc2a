"""The output folder's health: writable, not holding another run, enough disk, no leftovers of a killed write.

Checked before any data is tokenised, so a bad --output_dir costs seconds, not a training run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from .common import UserError, atomic_path

CKPT = re.compile(r"^checkpoint-(\d+)$")
# what lft.common's atomic_path/atomic_dir leave behind when killed: .<name>.<8 random>.tmp[.suffix], .<name>.old
_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old$")


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-<step> in `out`, oldest first."""
    if not out.is_dir():
        return []
    return sorted((int(m[1]), p) for p in out.iterdir() if p.is_dir() and (m := CKPT.match(p.name)))


def _nearest_existing(out: Path) -> Path:
    probe = out.absolute()
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: writing "into" it fails whatever the free space
            raise UserError(f"--output_dir {out}: {probe} is a symbolic link to {os.readlink(probe)}, which does "
                            "not exist; fix the link or pick another --output_dir")
        probe = probe.parent
    return probe


def check_output_dir(out: Path, resuming: bool) -> None:
    """Fail before any work if --output_dir cannot take this run: not a folder, not writable (tried for real,
    since root passes every permission check), or holding checkpoints of an earlier run while this one starts
    from scratch (they would mix with the new ones, and 'auto' would later pick the wrong one)."""
    probe = _nearest_existing(out)
    if not probe.is_dir():
        raise UserError(f"--output_dir {out}: {probe} is a file, not a folder; pick another --output_dir")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=probe)  # clean_stale's pattern
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"--output_dir {out}: cannot write in {probe} ({e.strerror}); "
                        "pick a writable --output_dir") from None
    found = checkpoints(out)
    if found and not resuming:
        raise UserError(f"--output_dir {out} already holds {found[-1][1].name} from an earlier run; continue it "
                        "with --resume_from_checkpoint auto, or pick a new --output_dir")


def check_free_space(out: Path, trainable_params: int, keep: int) -> None:
    """Fail if the disk cannot hold this run's peak: `keep` checkpoints plus one being written (fp32 weights and
    two AdamW moments: 12 bytes per trainable parameter) and two best_model copies while one replaces the other."""
    need = trainable_params * (12 * (keep + 1) + 8) + 16 * 2**20
    free = shutil.disk_usage(_nearest_existing(out)).free
    if free < need:
        raise UserError(f"--output_dir {out}: {free / 2**20:.0f} MiB free on its disk, but this run's checkpoints "
                        f"need about {need / 2**20:.0f} MiB; free some space, lower --save_total_limit "
                        "or pick another --output_dir")


def clean_stale(out: Path) -> list[str]:
    """Undo what a killed atomic write left in `out`: temp files and folders are removed; a folder that was
    moved aside (.<name>.old) but not yet replaced is put back. Returns what was done, for the log."""
    done = []
    if not out.is_dir():
        return done
    for p in sorted(out.iterdir()):
        if _TEMP.match(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            done.append(f"removed {p.name} (left by an interrupted write)")
        elif (m := _OLD.match(p.name)) and p.is_dir():
            target = out / m["name"]
            if target.exists() or _TEMP.match(target.name):
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name} (left by an interrupted replace)")
            else:
                os.replace(p, target)
                done.append(f"restored {target.name} from {p.name} (its replacement was interrupted)")
    return done


@contextlib.contextmanager
def writing(what: str, out: Path):
    """A failed write (disk full, folder removed, quota) becomes one line that says what is intact."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {what} in --output_dir {out} ({e.strerror or e}); earlier checkpoints "
                        "and best_model are intact: free space, then rerun with --resume_from_checkpoint auto"
                        ) from None


def truncate_log(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` (those before the checkpoint a run resumes from), so a resumed
    run's metrics.jsonl reads like an uninterrupted run's. A half-written last line is dropped."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line).get("step", math.inf) <= step:
                keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
