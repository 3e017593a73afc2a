"""The label set and how label text is normalised. No torch here: the MongoDB exporter imports it and
should start in a fraction of a second."""
from __future__ import annotations

import unicodedata

from .common import UserError

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
