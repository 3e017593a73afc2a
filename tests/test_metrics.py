"""Every metric comes from one confusion matrix; checked against numbers worked out by hand."""
import numpy as np
import pytest

from lft.data import DEFAULT_LABELS
from lft import metrics as M
from lft.metrics import confusion, confusion_figure, format_report, metrics_from_confusion, plot_confusion


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
