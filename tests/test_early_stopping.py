"""Early stopping: the exact evaluation it stops at, threshold semantics, state through torch.save/load and the
flag checks."""
import argparse
import math

import pytest
import torch

from lft.early_stopping import EarlyStopping, add_early_stopping_args, check_early_stopping_args


def run(stopper, values, every=100):
    """(step, improved, stop) for each evaluation until the stopper asks to stop."""
    out = []
    for i, v in enumerate(values, 1):
        improved, stop, reason = stopper.update(v, i * every)
        out.append((i * every, improved, stop))
        if stop:
            return out, reason
    return out, None


def test_stops_after_patience_evaluations_without_improvement():
    out, reason = run(EarlyStopping(patience=3), [0.50, 0.60, 0.60, 0.58, 0.59, 0.99])
    assert out == [(100, True, False), (200, True, False), (300, False, False), (400, False, False),
                   (500, False, True)]
    assert reason == "early stopping: no improvement of val macro-F1 > 0 in 3 evaluations (best 0.6000 at step 200)"


def test_improvement_resets_the_count():
    out, reason = run(EarlyStopping(patience=2), [0.5, 0.4, 0.6, 0.6, 0.55, 0.7])
    assert [s for s, _, stop in out if stop] == [500]
    assert reason.endswith("in 2 evaluations (best 0.6000 at step 300)")


def test_threshold_is_absolute_and_does_not_move_the_best():
    # each step beats the one before, none beats best + 0.01: the reference stays at 0.80 (no creeping forward)
    s = EarlyStopping(patience=3, threshold=0.01)
    out, reason = run(s, [0.80, 0.805, 0.809, 0.8099, 0.9])
    assert out[-1] == (400, False, True)
    assert reason == ("early stopping: no improvement of val macro-F1 > 0.01 in 3 evaluations "
                      "(best 0.8000 at step 100)")
    s = EarlyStopping(patience=3, threshold=0.01)
    assert s.update(0.80, 1).improved and not s.update(0.81, 2).improved and s.update(0.8101, 3).improved


def test_off_never_stops_but_tracks():
    for patience in (None, 0):
        s = EarlyStopping(patience)
        out, reason = run(s, [0.9] + [0.1] * 50)
        assert not s.enabled and reason is None and not any(stop for _, _, stop in out)
        assert (s.best, s.best_step, s.bad_evals) == (0.9, 100, 50)


def test_non_finite_metric_never_improves():
    s = EarlyStopping(patience=2)
    assert s.update(float("nan"), 10) == (False, False, "")
    assert s.best is None
    d = s.update(float("nan"), 20)
    assert d.stop and d.reason == "early stopping: no improvement of val macro-F1 > 0 in 2 evaluations (best none)"
    s = EarlyStopping(patience=2)
    s.update(0.5, 10)
    assert not s.update(float("inf"), 20).improved and s.best == 0.5


def test_resume_continues_the_count_exactly(tmp_path):
    """Interrupted after the 4th evaluation, saved like a checkpoint (weights_only load) and restored: the run
    stops at the same evaluation as an uninterrupted one."""
    values = [0.5, 0.7, 0.69, 0.68, 0.7, 0.71, 0.65]
    whole, reason = run(EarlyStopping(patience=3), values)
    first = EarlyStopping(patience=3)
    head, _ = run(first, values[:4])
    torch.save({"global_step": 400, "early_stopping": first.state_dict()}, tmp_path / "trainer_state.pt")
    saved = torch.load(tmp_path / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert saved["early_stopping"] == {"best": 0.7, "best_step": 200, "bad_evals": 2}
    second = EarlyStopping(patience=3)
    second.load_state_dict(saved["early_stopping"])
    tail = []
    for i, v in enumerate(values[4:], 5):
        d = second.update(v, i * 100)
        tail.append((i * 100, d.improved, d.stop))
        if d.stop:
            break
    assert head + tail == whole == [(100, True, False), (200, True, False), (300, False, False),
                                    (400, False, False), (500, False, True)]
    assert second.reason() == reason


def test_a_checkpoint_written_at_the_stop_says_so():
    s = EarlyStopping(patience=1)
    s.update(0.5, 1)
    s.update(0.4, 2)
    restored = EarlyStopping(patience=1)
    restored.load_state_dict(s.state_dict())
    assert restored.should_stop
    assert not EarlyStopping(patience=2).should_stop


@pytest.mark.parametrize("bad", [
    {"best": 0.5, "best_step": 10},  # a key missing
    {"best": 0.5, "best_step": 10, "bad_evals": 1, "x": 1},  # an extra key
    {"best": "0.5", "best_step": 10, "bad_evals": 1},
    {"best": float("nan"), "best_step": 10, "bad_evals": 1},
    {"best": 0.5, "best_step": None, "bad_evals": 1},
    {"best": 0.5, "best_step": -1, "bad_evals": 1},
    {"best": 0.5, "best_step": 10, "bad_evals": True},
    {"best": None, "best_step": None, "bad_evals": -1},
    [0.5, 10, 1],
])
def test_bad_state_is_refused(bad):
    with pytest.raises(ValueError, match="bad early-stopping state"):
        EarlyStopping(3).load_state_dict(bad)


def test_fresh_state_round_trips():
    s = EarlyStopping(3)
    s.load_state_dict(EarlyStopping(5).state_dict())
    assert s.state_dict() == {"best": None, "best_step": None, "bad_evals": 0}


def parse(argv):
    p = argparse.ArgumentParser()
    add_early_stopping_args(p)
    args = p.parse_args(argv)
    problems = []
    check_early_stopping_args(args, problems)
    return args, problems


def test_flags():
    args, problems = parse([])
    assert (args.early_stopping_patience, args.early_stopping_threshold, problems) == (None, 0.0, [])
    args, problems = parse(["--early_stopping_patience", "3", "--early_stopping_threshold", "1e-3"])
    assert (args.early_stopping_patience, args.early_stopping_threshold, problems) == (3, 0.001, [])
    assert parse(["--early_stopping_patience", "-1", "--early_stopping_threshold", "nan"])[1] == [
        "--early_stopping_patience must be >= 0 (0 or unset: off)",
        "--early_stopping_threshold must be a finite number >= 0"]
    assert parse(["--early_stopping_patience", "2", "--early_stopping_threshold", "-0.1"])[1] == [
        "--early_stopping_threshold must be a finite number >= 0"]
    assert parse(["--early_stopping_threshold", "0.1"])[1] == [
        "--early_stopping_threshold needs --early_stopping_patience"]


def test_constructor_refuses_what_the_flags_refuse():
    for kwargs in ({"patience": -1}, {"threshold": -0.1}, {"threshold": math.inf}):
        with pytest.raises(ValueError):
            EarlyStopping(**kwargs)
