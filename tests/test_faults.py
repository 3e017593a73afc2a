"""Faults a long training run must survive, each reproduced on CPU with the tiny checkpoint.

kill -9 (also mid-checkpoint), corrupt or half-written checkpoints, SIGTERM and Ctrl-C, a worker dying under
torchrun --max_restarts, non-finite losses (fp32 and fp16), out of memory, an unwritable or full output
folder, an incomplete base checkpoint, resuming with other flags. A resumed run is compared with one
uninterrupted run of the same recipe: losses, validation metrics and adapter tensors, bitwise (CPU fp32).
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qwen3_classification_direct as qcd
import train_lora
from conftest import REPO, subprocess_env
from lft import checkpoint as C
from lft.signals import StopRequest
from lft import data as D
from lft.common import UserError, run_cli
from test_train import base_args, read_log

RECIPE = ("--num_epochs", "3", "--save_steps", "9", "--save_total_limit", "3")  # 81 steps, eval every 27
RESUME = ("--resume_from_checkpoint", "auto")


@pytest.fixture(scope="module")
def reference(tiny_ckpt, demo_data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train_lora.main(base_args(tiny_ckpt, demo_data, out, *RECIPE)) == 0
    return out


def tensors(folder: Path) -> dict:
    return {f: load_file(str(folder / f)) for f in ("adapter_model.safetensors", "head.safetensors")}


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    for f in ta:
        assert ta[f].keys() == tb[f].keys() and all(torch.equal(ta[f][k], tb[f][k]) for k in ta[f]), (a, f)


def assert_same_run(out: Path, ref: Path, best_model: bool = True) -> None:
    """Everything a user keeps from a run equals the uninterrupted run's, bitwise."""
    assert [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in read_log(ref)]
    val = [(r["step"], r["accuracy"], r["macro_f1"]) for r in read_log(ref, "macro_f1")]
    assert [(r["step"], r["accuracy"], r["macro_f1"]) for r in read_log(out, "macro_f1")] == val
    assert_same_tensors(out / "checkpoint-81", ref / "checkpoint-81")
    if best_model:
        assert_same_tensors(out / "best_model", ref / "best_model")
        metrics = [json.loads((p / "best_model" / "classifier_config.json").read_text())["metrics"] for p in (out, ref)]
        assert metrics[0] == metrics[1]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no temp left over


def spawn(argv, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train_lora.py"), *argv], env=subprocess_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_until(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, "the run ended before the fault was injected"
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        time.sleep(0.001)


def writing_a_checkpoint(out: Path) -> bool:
    try:
        return any(n.startswith(".checkpoint-") for n in os.listdir(out))
    except FileNotFoundError:
        return False


# --- kill -9 and resume -----------------------------------------------------------------------------------

def test_kill9_twice_then_resume_equals_uninterrupted(tiny_ckpt, demo_data, reference, tmp_path, capsys):
    out = tmp_path / "run"
    argv = base_args(tiny_ckpt, demo_data, out, *RECIPE)
    # 1: killed while a checkpoint is being written (its temp folder exists), or failing that after checkpoint-27
    p = spawn(argv, tmp_path / "1.log")
    wait_until(p, lambda: writing_a_checkpoint(out) or (out / "checkpoint-27").is_dir())
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    # 2: the same command plus --resume_from_checkpoint auto, killed the moment checkpoint-54 exists
    p = spawn(argv + list(RESUME), tmp_path / "2.log")
    wait_until(p, lambda: (out / "checkpoint-54").is_dir())
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    # 3: once more, to the end
    assert train_lora.main(argv + list(RESUME)) == 0
    assert f"resumed from {out / 'checkpoint-54'} at step 54" in capsys.readouterr().out
    assert_same_run(out, reference)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {  # what a crash, a full disk or a bad copy can leave, and the reason the log gives
    "truncated adapter": (lambda c: _truncate(c / "adapter_model.safetensors"), "truncated or changed"),
    "flipped byte": (lambda c: _flip_byte(c / "trainer_state.pt"), "does not match its sha256"),
    "no trainer_state.json": (lambda c: (c / "trainer_state.json").unlink(), "save was interrupted"),
}


@pytest.mark.parametrize("damage", CORRUPTIONS)
def test_corrupt_newest_checkpoint_is_skipped_never_loaded(damage, tiny_ckpt, demo_data, reference, tmp_path,
                                                           capsys):
    out = tmp_path / "run"
    out.mkdir()
    for step in (63, 72):
        shutil.copytree(reference / f"checkpoint-{step}", out / f"checkpoint-{step}")
    corrupt, reason = CORRUPTIONS[damage]
    corrupt(out / "checkpoint-72")
    # what kill -9 during writes leaves besides: a checkpoint's temp folder, a temp file, a half-written log line
    (out / ".checkpoint-81.k2j4h5g6.tmp").mkdir()
    (out / ".checkpoint-81.k2j4h5g6.tmp" / "head.safetensors").write_bytes(b"\0" * 10)
    (out / ".args.json.ab12cd34.tmp.json").write_text("{")
    (out / "metrics.jsonl").write_text((reference / "metrics.jsonl").read_text() + '{"step": 82, "lo')
    argv = base_args(tiny_ckpt, demo_data, out, *RECIPE)
    with pytest.raises(UserError, match=reason):  # named explicitly, a bad checkpoint is an error
        train_lora.main(argv + ["--resume_from_checkpoint", str(out / "checkpoint-72")])
    assert train_lora.main(argv + list(RESUME)) == 0
    log = capsys.readouterr().out
    assert f"warning: skipping {out / 'checkpoint-72'}: " in log and reason in log
    assert f"resumed from {out / 'checkpoint-63'} at step 63" in log
    assert "note: removed .checkpoint-81.k2j4h5g6.tmp" in log
    shutil.copytree(reference / "best_model", out / "best_model", dirs_exist_ok=True)  # not part of this test
    assert_same_run(out, reference, best_model=False)


# --- SIGTERM, Ctrl-C ----------------------------------------------------------------------------------------

def test_sigterm_checkpoints_at_the_next_step_and_exits_143(tiny_ckpt, demo_data, reference, tmp_path):
    out = tmp_path / "run"
    argv = base_args(tiny_ckpt, demo_data, out, *RECIPE)
    p = spawn(argv, tmp_path / "run.log")
    wait_until(p, lambda: (out / "checkpoint-9").is_dir())
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    log = (tmp_path / "run.log").read_text()
    line = next(x for x in log.splitlines() if x.startswith("stopped by SIGTERM at step "))
    step = int(line.split("at step ")[1].split("/")[0])
    assert 9 < step < 81 and "Resume with the same command plus --resume_from_checkpoint auto" in line
    assert C.verify_checkpoint(out / f"checkpoint-{step}") is None
    assert "Traceback" not in log
    assert train_lora.main(argv + list(RESUME)) == 0
    assert_same_run(out, reference)


def test_ctrl_c_checkpoints_at_the_next_step_and_exits_130(tiny_ckpt, demo_data, reference, tmp_path, monkeypatch,
                                                           capsys):
    rotate = C.rotate_checkpoints

    def rotate_then_ctrl_c(out, keep):  # Ctrl-C arrives right after checkpoint-9 is written (inside step 9)
        rotate(out, keep)
        if not (out / "checkpoint-10").exists():
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(C, "rotate_checkpoints", rotate_then_ctrl_c)
    out = tmp_path / "run"
    argv = base_args(tiny_ckpt, demo_data, out, *RECIPE)
    assert train_lora.main(argv) == 130
    assert "stopped by SIGINT at step 10/81" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before  # handlers are given back
    assert C.verify_checkpoint(out / "checkpoint-10") is None
    monkeypatch.undo()
    assert train_lora.main(argv + list(RESUME)) == 0
    assert_same_run(out, reference)


def test_second_ctrl_c_interrupts_at_once():
    stop = StopRequest()
    stop.listen()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        stop.release()


# --- a worker dies under torchrun --max_restarts --------------------------------------------------------------

def _children(pid: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _rank(pid: int) -> int | None:
    try:
        env = dict(x.split("=", 1) for x in (Path("/proc") / str(pid) / "environ").read_text().split("\0") if "=" in x)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env else None


def test_torchrun_restarts_after_a_worker_stops_or_dies_and_resumes(tiny_ckpt, demo_data, tmp_path):
    """2 gloo processes under torchrun --max_restarts=2. After checkpoint-9, rank 1 alone gets SIGTERM: both ranks
    agree to stop at the next step and save it; torchrun restarts them and they resume. After checkpoint-18,
    rank 1 is killed (-9): torchrun restarts both again, they resume from the newest checkpoint and finish with
    the losses and metrics of 1 process x accumulation 2 (the same global batches)."""
    common = ["--num_epochs", "1", "--dropout", "0", "--lora_dropout", "0", "--batch_size", "4",
              "--eval_steps", "9", "--save_steps", "9", "--save_total_limit", "5"]
    one = tmp_path / "one"
    args1 = base_args(tiny_ckpt, demo_data, one, *common)
    args1[args1.index("--gradient_accumulation_steps") + 1] = "2"
    assert train_lora.main(args1) == 0

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=2",
           "--monitor_interval=0.2", str(REPO / "train_lora.py"), *base_args(tiny_ckpt, demo_data, two, *common),
           *RESUME]  # with restarts, 'auto' belongs in the command from the start
    log = tmp_path / "torchrun.log"
    p = subprocess.Popen(cmd, env=subprocess_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    for ready, sig in ((lambda: (two / "checkpoint-9").is_dir(), signal.SIGTERM),
                       (lambda: (two / "checkpoint-18").is_dir(), signal.SIGKILL)):
        wait_until(p, ready)
        workers = {_rank(pid): pid for pid in _children(p.pid)}
        os.kill(workers[1], sig)
    assert p.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "resume: no complete checkpoint" in text  # the first start
    stopped = [line for line in text.splitlines() if "stopped by a stop request on another process at step" in line]
    assert len(stopped) == 1, text[-3000:]  # rank 0 never got the signal, yet stopped with rank 1
    step = int(stopped[0].split("at step ")[1].split("/")[0])
    resumed = [int(line.rsplit("at step ", 1)[1]) for line in text.splitlines() if "resumed from" in line]
    assert resumed[0] == step and resumed[1] >= 18 and len(resumed) == 2, resumed
    a, b = [x["loss"] for x in read_log(one)], [x["loss"] for x in read_log(two)]
    assert len(a) == len(b) == 27 and a == pytest.approx(b, abs=1e-5)
    va, vb = read_log(one, "macro_f1"), read_log(two, "macro_f1")
    assert [(x["step"], x["accuracy"], x["macro_f1"]) for x in va] == [(x["step"], x["accuracy"], x["macro_f1"])
                                                                        for x in vb]
    ta, tb = tensors(one / "checkpoint-27"), tensors(two / "checkpoint-27")
    for f in ta:
        assert all(torch.allclose(ta[f][k], tb[f][k], atol=1e-4) for k in ta[f])


# --- non-finite losses ------------------------------------------------------------------------------------

def poison_training_forward(monkeypatch, bad_calls) -> None:
    """Training forward call n (n = optimizer step with accumulation 1) returns NaN logits if n in bad_calls. The
    start-up memory probe on a GPU (a row of nothing but padding) is not counted."""
    real, calls = qcd.Qwen3Classifier.forward, [0]

    def forward(self, *a, **k):
        logits = real(self, *a, **k)
        if self.training and not bool((k["input_ids"] == 151643).all()):
            calls[0] += 1
            if calls[0] in bad_calls:
                return logits * float("nan")
        return logits

    monkeypatch.setattr(qcd.Qwen3Classifier, "forward", forward)


def test_run_of_nonfinite_losses_stops_with_best_model_intact(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    poison_training_forward(monkeypatch, range(8, 1000))
    out = tmp_path / "run"
    argv = base_args(tiny_ckpt, demo_data, out, "--num_epochs", "1", "--eval_steps", "5", "--save_steps", "5",
                     "--max_nonfinite_steps", "3")
    with pytest.raises(UserError, match=r"3 consecutive steps with a non-finite loss \(the last at step 10\).*"
                                        r"best_model \(step 5\) is intact.*--max_nonfinite_steps"):
        train_lora.main(argv)
    assert json.loads((out / "best_model" / "classifier_config.json").read_text())["metrics"]["step"] == 5
    assert_same_tensors(out / "best_model", out / "checkpoint-5")
    assert all(torch.isfinite(t).all() for f in tensors(out / "best_model").values() for t in f.values())
    assert [r["step"] for r in read_log(out)] == list(range(1, 10))  # logged up to the last finished step


def test_fp16_scaler_skips_a_nonfinite_step_and_training_goes_on(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    poison_training_forward(monkeypatch, {12})
    out = tmp_path / "run"
    argv = base_args(tiny_ckpt, demo_data, out, "--num_epochs", "1", "--fp16", "--save_steps", "1",
                     "--save_total_limit", "30")
    assert train_lora.main(argv) == 0
    loss = {r["step"]: r["loss"] for r in read_log(out)}
    assert loss[12] != loss[12] and all(v == v for s, v in loss.items() if s != 12)  # NaN only at step 12
    assert_same_tensors(out / "checkpoint-12", out / "checkpoint-11")  # the step was skipped
    scale = {s: torch.load(out / f"checkpoint-{s}" / "trainer_state.pt", weights_only=True)["scaler"]["scale"]
             for s in (11, 12)}
    assert scale[12] == scale[11] / 2  # ... and the loss scale halved
    final = tensors(out / "checkpoint-27")["head.safetensors"]["score.weight"]
    assert not torch.equal(final, tensors(out / "checkpoint-12")["head.safetensors"]["score.weight"])


# --- out of memory ----------------------------------------------------------------------------------------

def test_out_of_memory_says_which_flag_to_lower(tiny_ckpt, demo_data, tmp_path, monkeypatch, capsys):
    def forward(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(qcd.Qwen3Classifier, "forward", forward)
    rc = run_cli(train_lora.main, base_args(tiny_ckpt, demo_data, tmp_path / "run", "--num_epochs", "1"))
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: out of GPU memory (tried to allocate 2.00 GiB")
    assert "lower --batch_size" in err[0] and "--max_length" in err[0] and "--gradient_accumulation_steps" in err[0]


# --- the output folder, the base checkpoint: checked before any data is tokenised -------------------------

@pytest.fixture
def no_tokenising(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("tokenised before the check")

    monkeypatch.setattr(D, "tokenize_split", fail)


def test_unwritable_output_dir_fails_before_tokenising(tiny_ckpt, demo_data, tmp_path, no_tokenising):
    with pytest.raises(UserError, match=r"cannot write in /proc .*pick a writable --output_dir"):
        train_lora.main(base_args(tiny_ckpt, demo_data, "/proc/lft-run"))  # not writable, even for root
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        train_lora.main(base_args(tiny_ckpt, demo_data, tmp_path / "file.txt" / "run"))


def test_full_disk_fails_before_tokenising(tiny_ckpt, demo_data, tmp_path, no_tokenising, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(UserError, match=r"1 MiB free on its disk, but this run's checkpoints need about \d+ MiB"):
        train_lora.main(base_args(tiny_ckpt, demo_data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_disk_full_while_saving_keeps_earlier_checkpoints(tiny_ckpt, demo_data, reference, tmp_path, monkeypatch):
    save, calls = torch.save, []

    def save_until_full(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_until_full)
    out = tmp_path / "run"
    argv = base_args(tiny_ckpt, demo_data, out, *RECIPE)
    with pytest.raises(UserError, match=r"cannot write checkpoint-18 .*No space left on device.*intact"):
        train_lora.main(argv)
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "checkpoint-9", "metrics.jsonl"]
    assert C.verify_checkpoint(out / "checkpoint-9") is None
    monkeypatch.undo()  # space freed
    assert train_lora.main(argv + list(RESUME)) == 0
    assert_same_run(out, reference)


def test_earlier_run_in_output_dir_needs_resume(tiny_ckpt, demo_data, reference, tmp_path, no_tokenising):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-81", out / "checkpoint-81")
    with pytest.raises(UserError, match="already holds checkpoint-81 from an earlier run; continue it with "
                                        "--resume_from_checkpoint auto"):
        train_lora.main(base_args(tiny_ckpt, demo_data, out, *RECIPE))


def test_resume_with_other_flags(tiny_ckpt, demo_data, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-81", out / "checkpoint-81")
    shutil.copytree(reference / "best_model", out / "best_model")
    with monkeypatch.context() as m:
        m.setattr(D, "tokenize_split", lambda *a, **k: pytest.fail("tokenised before the check"))
        with pytest.raises(UserError, match=r"made by a different run \(--lora_r 16 in the checkpoint vs 8 now\)"):
            train_lora.main(base_args(tiny_ckpt, demo_data, out, *RECIPE, *RESUME, "--lora_r", "8"))
    assert train_lora.main(base_args(tiny_ckpt, demo_data, out, *RECIPE, *RESUME, "--learning_rate", "1e-3")) == 0
    assert (f"warning: resuming {out / 'checkpoint-81'} with a changed recipe (--learning_rate 0.003 -> 0.001)"
            in capsys.readouterr().out)


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    for f in src.glob("*.safetensors"):
        os.symlink(f, dst / f.name)
    return dst


def test_incomplete_base_checkpoint_fails_first(tiny_ckpt, demo_data, tmp_path, no_tokenising):
    cut = _copy_ckpt(tiny_ckpt, tmp_path / "cut")
    (cut / "model.safetensors").unlink()
    data = (tiny_ckpt / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=r"model.safetensors has \d+ bytes, its header describes \d+ \(incomplete "
                                        r"download\?\); download the model again"):
        train_lora.main(base_args(cut, demo_data, tmp_path / "run"))
    sharded = _copy_ckpt(tiny_ckpt, tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="incomplete download, missing model-00002-of-00002.safetensors"):
        train_lora.main(base_args(sharded, demo_data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
