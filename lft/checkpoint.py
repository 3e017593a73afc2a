"""Training checkpoints: write, verify, find and load them; the output folder's health; stopping on a signal.

checkpoint-<step>/ holds
  adapter_model.safetensors, adapter_config.json,   an adapter folder, exactly like best_model/
  head.safetensors, classifier_config.json
  trainer_state.pt     optimizer, scheduler, GradScaler and every rank's RNG: tensors and plain values only,
                       read back with torch.load(weights_only=True), so a crafted file cannot run code
  trainer_state.json   step, best metric, world size, and the size and sha256 of every other file

The folder is built beside its final name (.checkpoint-<step>.XXXXXXXX.tmp) and renamed into place, with
trainer_state.json written last: a crash leaves the complete folder or a temp folder that the next start
removes. A checkpoint whose files do not match trainer_state.json (truncated, bit-flipped, half-copied) is
reported and skipped, never loaded.

SIGTERM (preemption) and Ctrl-C only set a flag (`StopRequest`); the training loop checks it at the next step
boundary, on every rank at once, saves a checkpoint there and exits.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .common import UserError, atomic_dir, atomic_path, redact, write_json
from .dist import Dist, barrier, gather_objects, print0

CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_PT, STATE_JSON = "trainer_state.pt", "trainer_state.json"
WEIGHTS = ("adapter_model.safetensors", "head.safetensors")
# what lft.common's atomic_path/atomic_dir leave behind when killed: .<name>.<8 random>.tmp[.suffix], .<name>.old
_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old$")
# arguments a resumed run must share with its checkpoint (else the weights do not fit), and those that only
# change the result (then the run still resumes, with a warning that it will not equal an uninterrupted one)
MUST_MATCH = ("labels", "lora_r", "lora_target_modules", "pooling")
SHOULD_MATCH = ("train_data", "batch_size", "gradient_accumulation_steps", "num_epochs", "seed", "max_length",
                "learning_rate", "warmup_ratio", "weight_decay", "class_weights", "group_by_length", "dedup",
                "lora_alpha", "lora_dropout", "dropout", "max_tokens_per_row", "packing")


# --- the output folder ----------------------------------------------------------------------------------

def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-<step> in `out`, oldest first."""
    if not out.is_dir():
        return []
    return sorted((int(m[1]), p) for p in out.iterdir() if p.is_dir() and (m := CKPT.match(p.name)))


def _nearest_existing(out: Path) -> Path:
    probe = out.absolute()
    while not probe.exists():
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


# --- writing ----------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(folder: Path, write_adapter, optimizer, scheduler, scaler, state: dict, d: Dist) -> None:
    """Call on every rank (RNG states are gathered); rank 0 writes. `write_adapter(tmp)` writes the adapter
    files into a folder. The whole checkpoint appears under its name at once, or not at all."""
    rng = gather_objects({"torch": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None}, d)
    if d.main:
        with writing(folder.name, folder.parent), atomic_dir(folder) as tmp:
            write_adapter(tmp)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "rng": rng, **state}, tmp / STATE_PT)
            files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
            write_json(tmp / STATE_JSON, {**state, "world": d.world, "files": files})  # last: the seal
    barrier(d)


def rotate_checkpoints(out: Path, keep: int) -> None:
    for _, p in checkpoints(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


# --- finding and loading ----------------------------------------------------------------------------------

def verify_checkpoint(folder: Path) -> str | None:
    """None if every file listed in trainer_state.json is there with its size and sha256, else the problem."""
    try:
        info = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        files = dict(info["files"])
    except FileNotFoundError:
        return f"no {STATE_JSON} (it is written last: the save was interrupted)"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{STATE_JSON} is unreadable"
    for name in WEIGHTS + (STATE_PT,):
        if name not in files:
            return f"{STATE_JSON} does not list {name}"
    for name, want in files.items():
        if Path(name).name != name or name.startswith("."):  # names come from a file: never leave the folder
            return f"{STATE_JSON} lists a bad file name {name!r}"
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            size, ok_size = path.stat().st_size, int(want["bytes"])
        except (KeyError, TypeError, ValueError):
            return f"{STATE_JSON} has no size for {name}"
        if size != ok_size:
            return f"{name} has {size} bytes, {ok_size} expected (truncated or changed)"
        if _sha256(path) != want.get("sha256"):
            return f"{name} does not match its sha256 (corrupt)"
    return None


def find_checkpoint(spec: str | None, out: Path) -> Path | None:
    """The checkpoint to resume from: `spec` is None (none), a folder, or 'auto' (the newest that verifies)."""
    if not spec:
        return None
    if spec != "auto":
        path = Path(spec)
        problem = verify_checkpoint(path) if path.is_dir() else "not a folder"
        if problem:
            raise UserError(f"--resume_from_checkpoint {path}: {problem}; give another checkpoint-* folder or 'auto'")
        return path
    for step, path in reversed(checkpoints(out)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        print0(f"warning: skipping {path}: {problem}")
    print0(f"resume: no complete checkpoint in {out} yet, starting from scratch")
    return None


def check_resume_args(path: Path, args, labels, world: int) -> None:
    """Refuse a checkpoint whose weights cannot fit this run; warn when resuming changes the recipe."""
    meta = json.loads((path / "classifier_config.json").read_text(encoding="utf-8"))
    saved = {**meta.get("args", {}), "labels": ",".join(meta.get("labels", []))}
    now = {**safe_args(args), "labels": ",".join(labels)}
    bad = [f"--{k} {saved.get(k)!r} in the checkpoint vs {now.get(k)!r} now" for k in MUST_MATCH
           if saved.get(k) != now.get(k)]
    if bad:
        raise UserError(f"--resume_from_checkpoint {path}: made by a different run ({'; '.join(bad)}); "
                        "use the same flags or a new --output_dir")
    changed = [f"--{k} {saved[k]!r} -> {now.get(k)!r}" for k in SHOULD_MATCH if k in saved and saved[k] != now.get(k)]
    saved_world = json.loads((path / STATE_JSON).read_text(encoding="utf-8")).get("world", world)
    if saved_world != world:
        changed.append(f"processes {saved_world} -> {world}")
    if changed:
        print0(f"warning: resuming {path} with a changed recipe ({', '.join(changed)}); the result will differ "
               "from an uninterrupted run")


def _check_state(state: dict, path: Path) -> dict:
    """The loop uses these values for file names and arithmetic: accept plain numbers only."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    ok = (is_int(state.get("global_step")) and is_int(state.get("nonfinite_run", 0))
          and (state.get("best_step") is None or is_int(state["best_step"]))
          and (state.get("best_metric") is None or (isinstance(state["best_metric"], float)
                                                    and math.isfinite(state["best_metric"]))))
    if not ok:
        shown = {k: state.get(k) for k in ("global_step", "best_step", "best_metric", "nonfinite_run")}
        raise UserError(f"{path / STATE_PT}: bad training state {redact(repr(shown))}; it was not written by this "
                        "toolkit")
    return {k: state.get(k) for k in ("global_step", "best_metric", "best_step", "nonfinite_run")}


def load_checkpoint(path: Path, model, load_adapter, optimizer, scheduler, scaler, d: Dist) -> dict:
    """Weights (through the model module's `load_adapter(model, folder)`), optimizer, scheduler, scaler and
    this rank's RNG from `path`; returns the loop state."""
    import pickle

    try:
        state = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:160]
        raise UserError(f"{path / STATE_PT}: refused to load ({first}); it holds more than tensors and plain "
                        "values, so it was not written by this toolkit") from None
    if not isinstance(state, dict):
        raise UserError(f"{path / STATE_PT}: not a training state; it was not written by this toolkit")
    loop = _check_state(state, path)
    load_adapter(model, path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    mine = rng[d.rank] if d.rank < len(rng) else rng[0]
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] is not None and d.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"])
    return loop


def safe_args(args) -> dict:
    """The run's arguments as recorded in args.json and every adapter: strings with any password removed."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in vars(args).items()}


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


# --- stopping on a signal ---------------------------------------------------------------------------------

class StopRequest:
    """Between listen() and release(), SIGTERM and Ctrl-C (SIGINT) set `signum` instead of stopping the process;
    a second Ctrl-C interrupts at once. The training loop reads it at each step boundary (all ranks agree)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"\n{signal.Signals(signum).name} received: stopping after this step with a checkpoint "
                  "(Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def listen(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old.setdefault(sig, signal.signal(sig, self._handle))

    def release(self) -> None:
        """Back to the previous handlers (a signal after training, e.g. during the test evaluation, acts as usual)."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request on another process"

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
