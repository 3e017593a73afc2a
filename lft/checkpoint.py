"""Training checkpoints: write, verify, find and load them.

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
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch

from . import adapter, base
from .common import UserError, atomic_dir, redact, write_json
from .dist import Dist, barrier, gather_objects, print0
from .outdir import checkpoints, writing

STATE_PT, STATE_JSON = "trainer_state.pt", "trainer_state.json"


# --- writing ----------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(folder: Path, model, meta: dict, optimizer, scheduler, scaler, state: dict, d: Dist) -> None:
    """Call on every rank (RNG states are gathered); rank 0 writes the adapter (lft.adapter) and the trainer
    state. The whole checkpoint appears under its name at once, or not at all."""
    rng = gather_objects({"torch": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None}, d)
    if d.main:
        with writing(folder.name, folder.parent), atomic_dir(folder) as tmp:
            adapter.save_adapter(model, tmp, meta)
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
    for name in adapter.WEIGHT_FILES + (STATE_PT,):
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


def check_resume(path: Path, labels, pooling: str, lora: dict) -> dict:
    """Refuse a checkpoint whose weights cannot fit this run (other labels, pooling or LoRA layout), read from
    its adapter files; returns its classifier_config (with the arguments that made it)."""
    meta = adapter.read_classifier_config(path, flag="--resume_from_checkpoint")
    lora_cfg = adapter.read_lora_config(path, meta)  # what loading the adapter reads, checked the same way
    saved = {"labels": meta["labels"], "pooling": meta["pooling"], "lora_r": lora_cfg["r"],
             "lora_target_modules": sorted(lora_cfg["targets"])}
    now = {"labels": list(labels), "pooling": pooling, "lora_r": lora["r"],
           "lora_target_modules": sorted(lora["targets"])}
    bad = [f"--{k} {saved[k]!r} in the checkpoint vs {now[k]!r} now" for k in saved if saved[k] != now[k]]
    if bad:
        raise UserError(f"--resume_from_checkpoint {path}: made by a different run ({'; '.join(bad)}); "
                        "use the same flags or a new --output_dir")
    return meta


def saved_world(path: Path, default: int) -> int:
    return json.loads((path / STATE_JSON).read_text(encoding="utf-8")).get("world", default)


def _check_state(state: dict, path: Path) -> dict:
    """The loop uses these values for file names and arithmetic: accept plain numbers only (the early-stopping
    state is checked by lft.early_stopping when the loop loads it)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    ok = (is_int(state.get("global_step")) and is_int(state.get("nonfinite_run", 0))
          and (state.get("best_step") is None or is_int(state["best_step"]))
          and (state.get("best_metric") is None or (isinstance(state["best_metric"], float)
                                                    and math.isfinite(state["best_metric"])))
          and isinstance(state.get("early_stopping"), (dict, type(None))))
    if not ok:
        shown = {k: state.get(k) for k in ("global_step", "best_step", "best_metric", "nonfinite_run")}
        raise UserError(f"{path / STATE_PT}: bad training state {redact(repr(shown))}; it was not written by this "
                        "toolkit")
    return {k: state.get(k) for k in ("global_step", "best_metric", "best_step", "nonfinite_run", "early_stopping")}


def load_checkpoint(path: Path, model, identity: dict, optimizer, scheduler, scaler, d: Dist) -> dict:
    """Weights, optimizer, scheduler, scaler and this rank's RNG from `path`; returns the loop state. The
    checkpoint must have been trained on the base loaded now (`identity`, lft.base)."""
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
    base.check_same_base(adapter.read_classifier_config(path)["base"], identity, path)
    adapter.load_adapter_weights(model, path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    mine = rng[d.rank] if d.rank < len(rng) else rng[0]
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] is not None and d.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"])
    return loop
