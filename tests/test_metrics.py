"""Every metric comes from one confusion matrix; checked against numbers worked out by hand."""
import numpy as np
import pytest

from lft.data import DEFAULT_LABELS
from lft.metrics import confusion, format_report, metrics_from_confusion, plot_confusion


def test_metrics_by_hand():
    """A 3-label matrix whose every number is worked out by hand (rows gold, columns predicted)."""
    cm = np.array([[5, 1, 0],    # gold a: 6 texts
                   [2, 3, 1],    # gold b: 6
                   [0, 0, 0]])   # gold c: none (precision of c is 0/1 -> 0, recall 0/0 -> 0)
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    assert m["n"] == 12 and m["accuracy"] == pytest.approx(8 / 12)
    pa, ra = 5 / 7, 5 / 6
    pb, rb = 3 / 4, 3 / 6
    fa, fb = 2 * pa * ra / (pa + ra), 2 * pb * rb / (pb + rb)
    c = m["per_class"]
    assert (c["a"]["precision"], c["a"]["recall"], c["a"]["f1"], c["a"]["support"]) == pytest.approx((pa, ra, fa, 6))
    assert (c["b"]["precision"], c["b"]["recall"], c["b"]["f1"], c["b"]["support"]) == pytest.approx((pb, rb, fb, 6))
    assert (c["c"]["precision"], c["c"]["recall"], c["c"]["f1"], c["c"]["support"]) == (0.0, 0.0, 0.0, 0)
    assert m["macro_precision"] == pytest.approx((pa + pb) / 3) and m["macro_f1"] == pytest.approx((fa + fb) / 3)
    assert m["weighted_recall"] == pytest.approx((6 * ra + 6 * rb) / 12)
    assert m["weighted_f1"] == pytest.approx((6 * fa + 6 * fb) / 12)
    assert m["confusion_matrix"] == cm.tolist()


def test_confusion_counts_pairs():
    assert confusion([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_report_and_png(tmp_path):
    cm = np.diag([3, 4, 5, 6, 7, 8])
    cm[0, 1] = 2
    m = metrics_from_confusion(cm, DEFAULT_LABELS)
    text = format_report(m)
    assert "政治安全" in text and "macro avg" in text and f"{m['macro_f1']:.4f}" in text
    plot_confusion(m, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temp file left
