"""Inductor's deterministic mode (qwen3_classification_direct.deterministic_inductor, the default) against inductor's
own timed choice of reduction configs (TORCHINDUCTOR_DETERMINISTIC=0): training throughput, evaluation time, compile
time, and whether two runs of one command, each with an empty compile cache, train to the same losses bit for bit.

Each run is train_lora.py in a child process on the Qwen3-1.7B-shaped checkpoint (bench_gpu.py), bench-length texts
(--train_texts x 1 epoch at the original recipe's flags, --val_texts evaluated every --eval_steps), with an inductor
and Triton cache of its own, empty at launch. The runs go in turn: rule, timed, rule, timed, ... (--runs of each).

    python bench/bench_deterministic.py --out bench/logs/det      # H200: ~3 min for 2 + 2 runs
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_startup import child_env  # noqa: E402  (this repository first on PYTHONPATH, unbuffered output)

COMPILE = re.compile(r"compile and memory probe ([\d.]+) s")


def one_run(ckpt: Path, train: Path, val: Path, work: Path, mode: str, args) -> dict:
    cache = Path(tempfile.mkdtemp(prefix=f"lft_det_{mode}_"))
    out = work / f"det_{mode}_{len(list(work.glob(f'det_{mode}_*')))}"
    shutil.rmtree(out, ignore_errors=True)
    env = child_env(TORCHINDUCTOR_CACHE_DIR=str(cache), TRITON_CACHE_DIR=str(cache / "triton"))
    if mode == "timed":
        env["TORCHINDUCTOR_DETERMINISTIC"] = "0"
    else:
        env.pop("TORCHINDUCTOR_DETERMINISTIC", None)
    cmd = [sys.executable, "train_lora.py", "--checkpoint", str(ckpt), "--train_data", str(train), "--val_data",
           str(val), "--output_dir", str(out), "--num_epochs", "1", "--batch_size", "18", "--learning_rate", "5e-5",
           "--max_length", "256", "--eval_steps", str(args.eval_steps), "--logging_steps", "10", "--no_progress",
           "--save_total_limit", "1"]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    shutil.rmtree(cache, ignore_errors=True)
    if r.returncode != 0:
        raise SystemExit(f"train_lora.py ({mode}) failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    ready = next((x for x in r.stdout.splitlines() if x.startswith("ready in")), "")
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in logs if "tokens_per_s" in x]
    steady = [x["tokens_per_s"] for x in train_rows if x["step"] > args.steady_after]
    evals = [x for x in logs if x.get("split") == "val"]
    return {"mode": mode, "wall_s": round(wall, 1), "ready": ready,
            "compile_s": float(COMPILE.search(ready)[1]) if COMPILE.search(ready) else None,
            "tokens_s_median": statistics.median(steady) if steady else None,
            "eval_s": [x["seconds"] for x in evals], "losses": [x["loss"] for x in train_rows],
            "val_macro_f1": [x["macro_f1"] for x in evals]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--workdir", default="/tmp/lft_bench")
    p.add_argument("--train_texts", type=int, default=10800, help="300 optimizer steps of 36 texts")
    p.add_argument("--val_texts", type=int, default=6000)
    p.add_argument("--eval_steps", type=int, default=150)
    p.add_argument("--steady_after", type=int, default=100, help="throughput: the log intervals after this step")
    p.add_argument("--runs", type=int, default=2, help="runs of each mode")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    import bench_gpu

    work = Path(args.workdir)
    ckpt = bench_gpu.build_checkpoint_folder(work / "qwen3-1.7b-shaped")
    tok = AutoTokenizer.from_pretrained(ckpt)
    train = bench_gpu.script_data(work, tok, args.train_texts, 30, f"det_train_{args.train_texts}")
    val = bench_gpu.script_data(work, tok, args.val_texts, 31, f"det_val_{args.val_texts}")
    rows = []
    for i in range(args.runs):
        for mode in ("rule", "timed"):
            rows.append(one_run(ckpt, train, val, work, mode, args))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
    first = {m: next(r for r in rows if r["mode"] == m) for m in ("rule", "timed")}
    print("\n| run | inductor's reductions | compile and memory probe s (cold) | training real tokens/s (median, "
          f"steps > {args.steady_after}) | evaluations s | losses bitwise equal to the first run of its mode | "
          "validation macro-F1 | equal to the first run of its mode |\n|---|---|---|---|---|---|---|---|")
    for k, r in enumerate(rows):
        mine = first[r["mode"]]
        print(f"| {k + 1} | {'by rule (deterministic, default)' if r['mode'] == 'rule' else 'timed (TORCHINDUCTOR_DETERMINISTIC=0)'} "
              f"| {r['compile_s']} | {r['tokens_s_median'] / 1e3:.1f}k | {', '.join(f'{s:.2f}' for s in r['eval_s'])} "
              f"| {r['losses'] == mine['losses']} | {', '.join(f'{f:.6f}' for f in r['val_macro_f1'])} "
              f"| {r['val_macro_f1'] == mine['val_macro_f1']} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_deterministic.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
