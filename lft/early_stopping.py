"""Early stopping on the validation macro-F1: stop after `patience` evaluations without an improvement.

An evaluation improves when its macro-F1 exceeds the best so far by more than `threshold` (absolute; the
Keras/Lightning `min_delta` convention: only such an improvement moves the reference best and resets the
count, so a run cannot creep forward by many sub-threshold steps). A non-finite metric never improves.
Off by default (`patience` None or 0): `update` still tracks the best but never asks to stop.

The state is three plain values (`state_dict()`), so it can sit in a checkpoint's trainer_state that is
read back with torch.load(weights_only=True); `load_state_dict` type-checks it. Restored, a resumed run
continues the count exactly where the checkpoint left it. `patience` and `threshold` are not state: they
come from the flags of the run (a resume may change them).

Usage (the integrator's wiring in train_lora.py):

    from lft.early_stopping import EarlyStopping, add_early_stopping_args, check_early_stopping_args

    add_early_stopping_args(parser)                      # --early_stopping_patience, --early_stopping_threshold
    check_early_stopping_args(args, problems)            # in check_args, before `if problems:`
    stopper = EarlyStopping(args.early_stopping_patience, args.early_stopping_threshold)
    state["early_stopping"] = stopper.state_dict()       # in every checkpoint's state (plain values)
    stopper.load_state_dict(saved["early_stopping"])     # on resume
    improved, stop, reason = stopper.update(m["macro_f1"], step)   # after each validation
    if stop:
        print0(reason)   # "early stopping: no improvement of val macro-F1 > 0 in 3 evaluations (best 0.9123 at step 400)"
"""
from __future__ import annotations

import math
from typing import NamedTuple


class Decision(NamedTuple):
    improved: bool  # the metric beat the best by more than the threshold (or is the first finite one)
    stop: bool  # patience is on and used up: save, leave the loop, finish as a completed run
    reason: str  # the log line when `stop`, else ""


class EarlyStopping:
    """Counts evaluations since the last improvement of more than `threshold`; see the module docstring."""

    def __init__(self, patience: int | None = None, threshold: float = 0.0, metric: str = "val macro-F1"):
        if patience is not None and patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
        self.patience = patience or 0  # 0: off
        self.threshold = float(threshold)
        self.metric = metric
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0  # evaluations since `best` was set

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    @property
    def should_stop(self) -> bool:
        """True when the restored state already used up the patience: a run resumed from the checkpoint written
        at the stop must not train on (the loop skips to the end)."""
        return self.enabled and self.bad_evals >= self.patience

    def update(self, value: float, step: int) -> Decision:
        value = float(value)
        improved = math.isfinite(value) and (self.best is None or value > self.best + self.threshold)
        if improved:
            self.best, self.best_step, self.bad_evals = value, int(step), 0
        else:
            self.bad_evals += 1
        stop = self.should_stop
        return Decision(improved, stop, self.reason() if stop else "")

    def reason(self) -> str:
        best = "none" if self.best is None else f"{self.best:.4f} at step {self.best_step}"
        return (f"early stopping: no improvement of {self.metric} > {self.threshold:g} in {self.bad_evals} "
                f"evaluation{'s' if self.bad_evals != 1 else ''} (best {best})")

    def state_dict(self) -> dict:
        """Plain float/int/None values only (torch.load(weights_only=True) reads them back)."""
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s values; anything else (wrong keys or types, a non-finite best, a negative
        count) raises ValueError, which the checkpoint loader turns into its 'bad training state' error."""
        def is_count(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        ok = (isinstance(state, dict) and set(state) == {"best", "best_step", "bad_evals"}
              and is_count(state["bad_evals"])
              and (state["best"] is None) == (state["best_step"] is None)
              and (state["best"] is None or (isinstance(state["best"], float) and math.isfinite(state["best"])
                                             and is_count(state["best_step"]))))
        if not ok:
            raise ValueError(f"bad early-stopping state {state!r}")
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


def add_early_stopping_args(parser) -> None:
    parser.add_argument("--early_stopping_patience", type=int, default=None,
                        help="stop after this many evaluations without a val macro-F1 improvement greater than "
                             "--early_stopping_threshold (default: off); best_model is the best evaluation")
    parser.add_argument("--early_stopping_threshold", type=float, default=0.0,
                        help="smallest val macro-F1 gain (absolute) that counts as an improvement (default 0)")


def check_early_stopping_args(args, problems: list) -> None:
    """Append a sentence to `problems` for each bad early-stopping flag (the caller raises them all at once)."""
    if args.early_stopping_patience is not None and args.early_stopping_patience < 0:
        problems.append("--early_stopping_patience must be >= 0 (0 or unset: off)")
    t = args.early_stopping_threshold
    if not (math.isfinite(t) and t >= 0):
        problems.append("--early_stopping_threshold must be a finite number >= 0")
    elif t > 0 and not args.early_stopping_patience:
        problems.append("--early_stopping_threshold needs --early_stopping_patience")
