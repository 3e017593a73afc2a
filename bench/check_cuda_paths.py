"""Smoke check of the code paths that exist only on CUDA, on the tiny demo checkpoint (a minute on one GPU).

CPU tests cannot reach them: varlen flash attention over packed rows, compiled decoder layers, CUDA graphs of
training steps and evaluation (captured, replayed, same numbers as without), the fused AdamW skipping a
non-finite update on the device, and step flags read one step late.

    python bench/check_cuda_paths.py [--workdir /tmp/lft_cuda_check]

Prints one line per check and exits non-zero if any fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qwen3_classification_direct as qcd  # noqa: E402
import test_saved_lora  # noqa: E402
import train_lora  # noqa: E402
from lft import cuda_graphs  # noqa: E402
from lft.common import UserError  # noqa: E402
from lft.demo import build_tiny_qwen3, write_demo_data  # noqa: E402


def poison(bad_calls):
    """Training forward call n returns NaN logits when n is in bad_calls."""
    real, calls = qcd.Qwen3Classifier.forward, [0]

    def forward(self, *a, **k):
        logits = real(self, *a, **k)
        probe = bool((k["input_ids"] == 151643).all())  # train_lora's start-up memory probe: all padding
        if self.training and not probe:
            calls[0] += 1
            if calls[0] in bad_calls:
                return logits * float("nan")
        return logits

    qcd.Qwen3Classifier.forward = forward
    return real


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/lft_cuda_check")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    ckpt = build_tiny_qwen3(work / "tiny")
    data = write_demo_data(work / "data")

    def run(name, *extra):
        return train_lora.main(["--checkpoint", str(ckpt), "--train_data", str(data["train"]), "--val_data",
                                str(data["val"]), "--output_dir", str(work / name), "--max_length", "64",
                                "--batch_size", "8", "--gradient_accumulation_steps", "1", "--learning_rate",
                                "3e-3", "--lora_r", "16", "--lora_alpha", "32", "--logging_steps", "1",
                                "--no_progress", *extra])

    failures = []
    made = []  # every RowGraphs the runs create, to see that graphs were captured and none failed
    init = cuda_graphs.RowGraphs.__init__

    def recording_init(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    cuda_graphs.RowGraphs.__init__ = recording_init

    def check(name, ok, detail=""):
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
        if not ok:
            failures.append(name)

    rc = run("learn", "--num_epochs", "4", "--eval_steps", "27", "--test_data", str(data["test"]))
    res = json.loads((work / "learn" / "test_results.json").read_text())
    check("train on CUDA (packed, varlen, compiled, CUDA graphs) learns", rc == 0 and res["macro_f1"] >= 0.9,
          f"macro-F1 {res['macro_f1']:.3f}")
    check("graphs captured (training steps and evaluation)", len(made) >= 2 and all(g.captures > 0 for g in made),
          "; ".join(f"{g.captures} captured, {len(g.graphs)} kept" for g in made))

    def losses(name):
        rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], [r["macro_f1"] for r in rows if r.get("split") == "val"]

    same = ("--num_epochs", "1", "--lora_dropout", "0", "--dropout", "0", "--eval_steps", "9")
    run("graphs_on", *same)
    run("graphs_off", *same, "--cuda_graphs", "off")
    (la, fa), (lb, fb) = losses("graphs_on"), losses("graphs_off")
    # bf16 rounding differs a little (the fixed-shape row pads matmuls), and training amplifies it: the first
    # steps must agree closely, the end of the run loosely
    worst = max(abs(a - b) / max(abs(b), 1e-3) for a, b in zip(la[:5], lb[:5]))
    check("graph replays give the eager losses and val metrics (bf16, no dropout)",
          len(la) == len(lb) > 10 and worst < 0.02 and max(abs(a - b) for a, b in zip(fa, fb)) <= 0.1,
          f"{len(la)} steps, first 5 losses: worst relative diff {worst:.2e}; val macro-F1 {fa} vs {fb}")
    pred = {}
    for flag in ("on", "off"):
        test_saved_lora.main(["--checkpoint", str(ckpt), "--lora_model", str(work / "learn" / "best_model"),
                              "--test_data", str(data["test"]), "--output_dir", str(work / f"eval_{flag}"),
                              "--predictions_format", "csv", "--cuda_graphs", flag])
        pred[flag] = json.loads((work / f"eval_{flag}" / "test_results.json").read_text())
    check("test_saved_lora: graphs on == off", abs(pred["on"]["accuracy"] - pred["off"]["accuracy"]) <= 0.01,
          f"accuracy {pred['on']['accuracy']:.4f} vs {pred['off']['accuracy']:.4f}")

    real = poison({12})
    rc = run("skip", "--num_epochs", "1", "--save_steps", "1", "--save_total_limit", "30", "--cuda_graphs", "off")
    from safetensors.torch import load_file
    a = load_file(str(work / "skip" / "checkpoint-11" / "head.safetensors"))["score.weight"]
    b = load_file(str(work / "skip" / "checkpoint-12" / "head.safetensors"))["score.weight"]
    c = load_file(str(work / "skip" / "checkpoint-27" / "head.safetensors"))["score.weight"]
    check("one NaN step: skipped on the device, training goes on", rc == 0 and torch.equal(a, b)
          and not torch.equal(b, c) and bool(torch.isfinite(c).all()))
    qcd.Qwen3Classifier.forward = real

    poison(range(8, 10_000))
    try:
        run("stop", "--num_epochs", "1", "--eval_steps", "5", "--save_steps", "5", "--max_nonfinite_steps", "3",
            "--cuda_graphs", "off")
        check("a run of NaN steps stops", False, "no error raised")
    except UserError as e:
        best = load_file(str(work / "stop" / "best_model" / "head.safetensors"))["score.weight"]
        check("a run of NaN steps stops (flags read one step late)", "the last at step 10" in str(e)
              and bool(torch.isfinite(best).all()), str(e)[:120])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
