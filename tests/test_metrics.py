"""Metrics from one confusion matrix equal scikit-learn's on the raw predictions."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from lft.data import DEFAULT_LABELS
from lft import metrics as M
from lft.metrics import confusion, confusion_figure, format_report, metrics_from_confusion, plot_confusion


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 6, 500)
    pred = np.where(rng.random(500) < 0.6, gold, rng.integers(0, 6, 500))
    if seed == 2:
        gold[gold == 5] = 4  # a label with no support: zero_division handling
    m = metrics_from_confusion(confusion(gold, pred, 6), DEFAULT_LABELS)
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(gold, pred, labels=range(6), average=avg, zero_division=0)
        assert (m[f"{avg}_precision"], m[f"{avg}_recall"], m[f"{avg}_f1"]) == pytest.approx((p, r, f), abs=1e-12)
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=range(6), average=None, zero_division=0)
    for i, name in enumerate(DEFAULT_LABELS):
        c = m["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))


def test_summed_confusion_equals_whole():
    """What distributed evaluation does: per-rank matrices summed == one matrix over all texts."""
    rng = np.random.default_rng(3)
    gold, pred = rng.integers(0, 6, 301), rng.integers(0, 6, 301)
    parts = [confusion(gold[r::2], pred[r::2], 6) for r in range(2)]
    assert metrics_from_confusion(parts[0] + parts[1], DEFAULT_LABELS) == \
        metrics_from_confusion(confusion(gold, pred, 6), DEFAULT_LABELS)


def test_report_and_png(tmp_path):
    cm = np.diag([3, 4, 5, 6, 7, 8])
    cm[0, 1] = 2
    m = metrics_from_confusion(cm, DEFAULT_LABELS)
    text = format_report(m)
    assert "政治安全" in text and "macro avg" in text and f"{m['macro_f1']:.4f}" in text
    plot_confusion(m, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temp file left


def test_png_names_in_the_packaged_cjk_font():
    """The label names are drawn in the font requirements.txt installs (not a system font), and every glyph
    exists in it (matplotlib warns on a missing glyph; here that is an error)."""
    import io
    import warnings

    from matplotlib import font_manager

    import matplotlib.pyplot as plt

    m = metrics_from_confusion(np.diag([3, 4, 5, 6, 7, 8]), DEFAULT_LABELS)
    family = list(plt.rcParams["font.family"])
    fig = confusion_figure(m)
    ax = fig.axes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.savefig(io.BytesIO(), format="png")
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        assert [t.get_text() for t in ticks] == list(DEFAULT_LABELS)
        for t in ticks:
            path = font_manager.findfont(t.get_fontproperties(), fallback_to_default=False)
            assert path.endswith("paperang_p2_fonts_cjk/fonts/wqy-microhei.ttc")
    assert M.cjk_font() == "WenQuanYi Micro Hei"
    plt.close(fig)
    assert plt.rcParams["font.family"] == family  # the process's other plots keep their font


def test_png_without_cjk_font_uses_ids(monkeypatch):
    monkeypatch.setattr(M, "cjk_font", lambda: None)
    fig = confusion_figure(metrics_from_confusion(np.diag([1, 2, 3, 4, 5, 6]), DEFAULT_LABELS))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3", "4", "5"]
    assert "no CJK font installed" in ax.get_title()
