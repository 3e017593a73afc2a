"""Every reported number comes from one confusion matrix, through scikit-learn.

Distributed evaluation sums per-rank confusion matrices (counts, never means), so the metrics of N ranks
equal those of one process over the same texts.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .common import display_width


def confusion(y_true, y_pred, num_labels: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=list(range(num_labels)))


def metrics_from_confusion(cm: np.ndarray, label_names) -> dict:
    """Accuracy, macro/weighted P/R/F1 and per-class P/R/F1/support, as scikit-learn computes them.

    sklearn takes label vectors, not a matrix, so the matrix is expanded back into the (gold, predicted)
    pairs it counts; the result is exactly sklearn's on the original predictions."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    cm = np.asarray(cm, dtype=np.int64)
    k = len(label_names)
    gold = np.repeat(np.repeat(np.arange(k), k), cm.ravel())
    pred = np.repeat(np.tile(np.arange(k), k), cm.ravel())
    labels = list(range(k))
    out = {"n": int(cm.sum()), "accuracy": float(accuracy_score(gold, pred)) if len(gold) else 0.0}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(gold, pred, labels=labels, average=avg, zero_division=0)
        out.update({f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)})
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels, average=None, zero_division=0)
    out["per_class"] = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(s[i])} for i, name in enumerate(label_names)}
    out["labels"] = list(label_names)
    out["confusion_matrix"] = cm.tolist()
    return out


def _cell(s, w: int, right: bool = True) -> str:
    s = str(s)
    pad = " " * max(0, w - display_width(s))
    return pad + s if right else s + pad


def format_report(m: dict) -> str:
    """Readable tables for the console (CJK-aware column widths)."""
    names = m["labels"]
    w = max(10, *(display_width(n) for n in names)) + 2
    lines = [f"n={m['n']}  accuracy={m['accuracy']:.4f}  macro-F1={m['macro_f1']:.4f}  "
             f"weighted-F1={m['weighted_f1']:.4f}", "",
             _cell("label", w, False) + "".join(_cell(h, 11) for h in ("precision", "recall", "f1", "support"))]
    for n in names:
        c = m["per_class"][n]
        lines.append(_cell(n, w, False) + f"{c['precision']:>11.4f}{c['recall']:>11.4f}{c['f1']:>11.4f}"
                     f"{c['support']:>11d}")
    for avg in ("macro", "weighted"):
        lines.append(_cell(f"{avg} avg", w, False) + f"{m[avg + '_precision']:>11.4f}{m[avg + '_recall']:>11.4f}"
                     f"{m[avg + '_f1']:>11.4f}{m['n']:>11d}")
    lines += ["", "confusion matrix (rows gold, columns predicted):",
              _cell("", w, False) + "".join(_cell(n, w) for n in names)]
    for n, row in zip(names, m["confusion_matrix"]):
        lines.append(_cell(n, w, False) + "".join(_cell(v, w) for v in row))
    return "\n".join(lines)


# A font with Chinese glyphs that pip installs (requirements.txt): WenQuanYi Micro Hei, 5 MB, in the package
# paperang-p2-fonts-cjk (package MIT; the font is free to redistribute: Apache-2.0 / GPLv3 with the font
# exception upstream, OFL as the package states). Only its file is used: the package's code is never imported.
CJK_FONT_FILE = ("paperang_p2_fonts_cjk", "fonts/wqy-microhei.ttc")
SYSTEM_CJK_FONTS = ("Noto Sans CJK", "WenQuanYi", "SimHei", "Source Han", "Droid Sans Fallback")


@functools.lru_cache(maxsize=None)
def cjk_font() -> str | None:
    """The family name of a font that has Chinese glyphs: the packaged one (registered with matplotlib on first
    use), else one the system has, else None (then the plot labels with ids)."""
    import importlib.util

    from matplotlib import font_manager

    spec = importlib.util.find_spec(CJK_FONT_FILE[0])  # finds the folder; runs none of the package's code
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / CJK_FONT_FILE[1]
        if path.is_file():
            font_manager.fontManager.addfont(str(path))
            return font_manager.FontProperties(fname=str(path)).get_name()
    system = [f.name for f in font_manager.fontManager.ttflist if any(k in f.name for k in SYSTEM_CJK_FONTS)]
    return sorted(system)[0] if system else None


def warm_up(table_format: str | None = None) -> None:
    """Import what the reports need, ahead of use: scikit-learn's metrics, matplotlib with its CJK font and, for
    an .xlsx predictions table, openpyxl. test_saved_lora.py runs this in a thread while its main thread waits on
    the GPU (~1.5 s of imports on an H200 host with transformers 5.23, which no longer imports scikit-learn
    itself: bench/RESULTS.md run 38)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import sklearn.metrics  # noqa: F401

    if table_format == "xlsx":
        import openpyxl  # noqa: F401
    cjk_font()


def confusion_figure(m: dict):
    """The confusion matrix as a matplotlib figure (row-normalised colours, counts in the cells), label names
    on the axes in a CJK font (ids when there is none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = cjk_font()
    names = m["labels"] if font else [f"{i}" for i in range(len(m["labels"]))]
    cm = np.asarray(m["confusion_matrix"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.1 * len(names) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    # the font on the names only (never rcParams: later plots of the process keep theirs)
    tick_font = {"fontfamily": [font, "DejaVu Sans"]} if font else {}
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", **tick_font)
    ax.set_yticks(range(len(names)), names, **tick_font)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    title = f"accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}"
    if not font:
        title += "\n(no CJK font installed: ticks are label ids, names in test_results.json)"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_confusion(m: dict, path) -> None:
    """Confusion matrix as a PNG (see confusion_figure)."""
    import matplotlib.pyplot as plt

    from .common import atomic_path

    fig = confusion_figure(m)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
