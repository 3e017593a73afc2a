"""The label set, how label text is normalised, and per-label thresholds (which label a text gets). No torch
here: the MongoDB exporter and serve.py's HTTP worker processes import it and should start in a fraction of a
second."""
from __future__ import annotations

import math
import unicodedata
from typing import TYPE_CHECKING

from .common import UserError

if TYPE_CHECKING:
    import numpy as np


# The original project's label set and order: id -> name. Adapters store their own copy (id2label).
DEFAULT_LABELS = ("正常", "歧视", "违法违规", "政治安全", "暴恐", "色情低俗")


def clean_label(value) -> str:
    """Full-width -> half-width and stray whitespace removed (NFKC), so ' 暴恐 ' and '４' are recognised."""
    return unicodedata.normalize("NFKC", str(value)).strip()


def parse_labels(spec: str | None) -> tuple[str, ...]:
    if not spec:
        return DEFAULT_LABELS
    names = tuple(clean_label(x) for x in spec.split(",") if clean_label(x))
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError(f"--labels: need at least two distinct comma-separated names, got {spec!r}")
    return names


# --- thresholds --------------------------------------------------------------------------------------------

def parse_thresholds(spec: str | None, labels, flag: str = "--threshold") -> dict[int, float]:
    """'暴恐:0.3,色情低俗:0.5' -> {4: 0.3, 5: 0.5}. Full-width ':' and ',' are accepted."""
    if not spec:
        return {}
    by_name = {n: i for i, n in enumerate(labels)}
    out = {}
    for part in spec.replace("，", ",").replace("：", ":").split(","):
        if not part.strip():
            continue
        name, sep, value = part.rpartition(":")
        name = clean_label(name)
        try:
            t = float(value)
        except ValueError:
            t = math.nan
        if not sep or name not in by_name or not 0 < t <= 1:
            raise UserError(f"{flag} {spec!r}: each item must be label:probability with a known label and "
                            f"0 < probability <= 1 (bad: {part.strip()!r}; labels: {', '.join(labels)})")
        out[by_name[name]] = t
    return out


def choose_labels(probs: np.ndarray, thresholds: dict[int, float] | None = None) -> np.ndarray:
    """Label id per row: among the labels whose threshold the row reaches, the most probable; else argmax."""
    import numpy as np

    pred = probs.argmax(1)
    if thresholds:
        ids = np.array(sorted(thresholds))
        reached = probs[:, ids] >= np.array([thresholds[i] for i in ids])
        masked = np.where(reached, probs[:, ids], -1.0)
        hit = reached.any(1)
        pred = np.where(hit, ids[masked.argmax(1)], pred)
    return pred
