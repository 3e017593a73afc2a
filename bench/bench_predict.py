"""Prediction benchmark: predict.py end to end on 100,000 texts, and the API's latency on one short text.

Trains nothing: a random LoRA adapter is saved on a Qwen3-1.7B-shaped random checkpoint (bench_gpu.py's
build_checkpoint_folder; the speed is that of real weights), 100,000 texts with bench_gpu.py's token-length
distribution (log-normal, median 70, clipped to [8, 256]) go to a csv, and

  (c) predict.py runs on it as a child process; its own timer starts after the model is loaded and covers
      reading, tokenising, classifying and writing: real (non-padding) tokens/s and texts/s; wall time too;
  (d) Classifier.predict on one short text, 200 calls after 20 warm-up calls: p50 / p99 latency.

    python bench/bench_predict.py                       # one CUDA GPU (the integrator's H200 run)
    python bench/bench_predict.py --quick               # CPU smoke test on the tiny checkpoint (small numbers)

Prints a markdown table and writes bench_predict.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_gpu import LORA, build_checkpoint_folder, script_data  # noqa: E402

LABELS = ["正常", "歧视", "违法违规", "政治安全", "暴恐", "色情低俗"]


def random_adapter(ckpt: Path, folder: Path, max_length: int = 256) -> Path:
    """An adapter folder for `ckpt` with random LoRA and head weights, recorded on that base like a trained one."""
    import qwen3_classification_direct as qcd
    from lft import adapter, base

    if (folder / "classifier_config.json").is_file():
        return folder
    torch.manual_seed(0)
    backbone = qcd.load_backbone(ckpt, torch.float32)
    meta = {"labels": LABELS, "id2label": dict(enumerate(LABELS)), "max_length": max_length,
            "base": base.identity(ckpt, backbone), "args": {"lora_r": LORA["r"], "lora_alpha": LORA["alpha"]},
            "metrics": None, "note": "random weights, bench/bench_predict.py"}
    model = qcd.add_lora(qcd.Qwen3Classifier(backbone, len(LABELS), 0.0, "last"), **LORA)
    with torch.no_grad():  # peft starts lora_B at zero: make the adapter change the output, as a trained one does
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapter.save_adapter(model, folder, meta)
    return folder


def write_texts(work: Path, ckpt: Path, n: int) -> Path:
    import pandas as pd
    from transformers import AutoTokenizer

    path = work / f"predict_{n}.csv"
    if not path.is_file():
        jsonl = script_data(work, AutoTokenizer.from_pretrained(ckpt), n, 40, f"predict_{n}")
        pd.read_json(jsonl, lines=True, dtype=False).to_csv(path, index=False)
    return path


def time_script(model: Path, ckpt: Path, data: Path, out: Path, device: str, extra: list[str]) -> dict:
    cmd = [sys.executable, str(REPO / "predict.py"), "--lora_model", str(model), "--checkpoint", str(ckpt),
           "--input", str(data), "--output", str(out), "--overwrite", "--no_progress", "--device", device, *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"predict.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
    m = re.search(r"([\d,]+) texts in ([\d.]+) s: ([\d,]+) texts/s, ([\d,]+) tokens/s", r.stdout)
    load = re.search(r"loaded in ([\d.]+) s", r.stdout)
    num = lambda s: float(s.replace(",", ""))  # noqa: E731
    print(r.stdout, flush=True)
    where = re.search(r"^time: (.*)$", r.stdout, re.M)
    return {"texts": num(m[1]), "seconds": num(m[2]), "texts_s": num(m[3]), "tokens_s": num(m[4]),
            "load_s": num(load[1]), "wall_s": wall, "where": where[1] if where else ""}


def time_api(model: Path, ckpt: Path, device: str, calls: int, warmup: int = 20) -> dict:
    """Classifier.predict on one short text: p50/p99 of the whole call, and p50 of its stages (tokenise,
    forward to probabilities on the CPU, labels and Prediction objects)."""
    from lft.predict import Classifier, choose_labels

    clf = Classifier.load(model, checkpoint=ckpt, device=device)
    text = ["这家店的服务态度很好，下次还来。"]
    for _ in range(warmup):  # first calls compile and capture graphs
        clf.predict(text)
    sync = torch.cuda.synchronize if clf.runtime.device.type == "cuda" else (lambda: None)
    times, stages = [], {"tokenise": [], "forward": [], "labels": []}
    for _ in range(calls):
        sync()
        t = time.perf_counter()
        clf.predict(text)  # returns Python floats: the result is on the CPU, so the time is complete
        times.append(time.perf_counter() - t)
    for _ in range(calls):
        sync()
        t0 = time.perf_counter()
        ids = clf.encode(text)
        t1 = time.perf_counter()
        P = clf.proba_of_ids(ids)
        t2 = time.perf_counter()
        clf.to_predictions(P, choose_labels(P))
        t3 = time.perf_counter()
        for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
            stages[k].append(dt)
    pick = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1000  # noqa: E731
    return {"calls": calls, "p50_ms": pick(times, 0.50), "p99_ms": pick(times, 0.99),
            "stages_p50_ms": {k: round(pick(v, 0.5), 3) for k, v in stages.items()},
            "precision": clf.runtime.precision}


def profile(model: Path, ckpt: Path, data: Path, n: int, out: Path, device: str) -> dict:
    """Where predict.py's model time goes, in this process, on the first `n` texts of the csv tokenised up
    front: Classifier.proba_of_ids in chunks of predict.py's size, a first pass (compiling, each new row shape's
    eager first run, captures on second use) and again (every shape captured), for the product's row shapes
    (lft.data.eval_shape: few) and for the earlier ones (every width in steps of 512, slots a power of two over
    the texts: run 12), and in chunks while a second thread tokenises (the GIL shared as in predict.py). The
    product's rows go first, on a cold compile cache. Per first pass: row shapes, eager runs and their seconds,
    captures, dynamo's compile seconds. Real tokens/s of each, printed as a table."""
    import threading

    import pandas as pd

    import lft.cuda_graphs as G
    from lft import data as D
    from lft.predict import Classifier

    texts = pd.read_csv(data, nrows=n)["text_cn"].astype(str).tolist()
    rows, stats = {}, {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    eager = []  # (shape key, seconds) of every eager run
    plain_eager = G.RowGraphs._eager

    def timed_eager(self, inputs):
        sync()
        t = time.perf_counter()
        y = plain_eager(self, inputs)
        sync()
        eager.append((self.key(inputs), time.perf_counter() - t))
        return y
    G.RowGraphs._eager = timed_eager

    def compile_seconds() -> float:
        from torch._dynamo.utils import compilation_time_metrics as m  # name -> [seconds]

        return sum(sum(v) for k, v in m.items() if k.endswith("compile_inner"))

    def timed(name, clf, ids, chunk):
        eager.clear()
        c0 = compile_seconds()
        sync()
        t = time.perf_counter()
        for k in range(0, len(ids), chunk):
            clf.proba_of_ids(ids[k:k + chunk])
        sync()
        rows[name] = sum(map(len, ids)) / (time.perf_counter() - t)
        g = clf.predictor._graphs
        stats[name] = {"shapes": len(g.seen) if g else 0, "captures": g.captures if g else 0,
                       "capture_s": round(g.capture_seconds, 2) if g else 0, "eager_runs": len(eager),
                       "eager_s": round(sum(s for _, s in eager), 2),
                       "compile_s": round(compile_seconds() - c0, 2)}
        print(f"{name}: {rows[name]:,.0f} tokens/s {stats[name]}", flush=True)

    old_shape = D.eval_shape
    for policy in ("few row shapes (eval_shape)", "every width in steps of 512 (run 12)"):
        if policy.startswith("every"):
            D.eval_shape = lambda n_texts, n_tokens, max_len, cap=None: D.static_shape(
                n_texts, n_tokens, max_len, D.TRAIN_ROW_STEP if n_tokens <= D.SMALL_ROW_TOKENS else D.EVAL_ROW_STEP)
            torch._dynamo.reset()  # compiles again (from the warm disk cache), as a new process would
        clf = Classifier.load(model, checkpoint=ckpt, device=device)
        ids = clf.encode(texts)
        timed(f"{policy}: chunks of 8,192, first pass", clf, ids, 8192)
        timed(f"{policy}: chunks of 8,192, again", clf, ids, 8192)
        if policy.startswith("few"):
            stop = threading.Event()

            def tokenise():
                while not stop.is_set():
                    clf.encode(texts[:8192])
            th = threading.Thread(target=tokenise, daemon=True)
            th.start()
            timed(f"{policy}: chunks of 8,192 while a thread tokenises", clf, ids, 8192)
            switch = sys.getswitchinterval()
            sys.setswitchinterval(0.0005)  # the GIL handed over every 0.5 ms instead of 5
            timed(f"{policy}: chunks of 8,192 while a thread tokenises, GIL switch interval 0.5 ms", clf, ids, 8192)
            sys.setswitchinterval(switch)
            stop.set()
            th.join()
        clf = None
        if device == "cuda":
            torch.cuda.empty_cache()
    D.eval_shape, G.RowGraphs._eager = old_shape, plain_eager
    print("\n| pass | real tokens/s | row shapes | eager runs (s) | captures (s) | dynamo compile s |\n|---|---|---|---|---|---|")
    for k, v in rows.items():
        s = stats[k]
        print(f"| {k} | {v / 1e3:,.1f}k | {s['shapes']} | {s['eager_runs']} ({s['eager_s']}) | {s['captures']} "
              f"({s['capture_s']}) | {s['compile_s']} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_predict_profile.json").write_text(json.dumps({"tokens_s": rows, "stats": stats}, indent=2))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny checkpoint, 2,000 texts, 50 calls")
    p.add_argument("--texts", type=int, default=None, help="texts in the csv (default: 100,000; --quick 2,000)")
    p.add_argument("--calls", type=int, default=None, help="API calls timed (default: 200; --quick 50)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="instead: where the model time goes, on the "
                   "first N texts, in this process (see profile())")
    p.add_argument("--workdir", default="/tmp/lft_bench", help="checkpoint, adapter and data go here")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where bench_predict.json goes")
    args, extra = p.parse_known_args(argv)  # the rest goes to predict.py (e.g. --max_tokens 8192)
    work = Path(args.workdir) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    n = args.texts or (2000 if args.quick else 100_000)
    calls = args.calls or (50 if args.quick else 200)
    device = "cpu" if args.quick else "cuda"
    if args.quick:
        from lft.demo import build_tiny_qwen3

        ckpt = build_tiny_qwen3(work / "qwen3-tiny")
    else:
        ckpt = build_checkpoint_folder(Path(args.workdir) / "qwen3-1.7b-shaped")
    model = random_adapter(ckpt, work / "random_adapter")
    data = write_texts(work, ckpt, n)
    if args.profile:
        profile(model, ckpt, data, args.profile, Path(args.out), device)
        return 0
    script = time_script(model, ckpt, data, work / "predictions.csv", device, extra)
    api = time_api(model, ckpt, device, calls)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    shape = "tiny Qwen3 (2 layers, hidden 64)" if args.quick else "Qwen3-1.7B-shaped"
    print(f"\n{shape} on {name}, {api['precision']}; texts of median 70 tokens (clipped to 8..256)\n")
    print("| measure | value |\n|---|---|")
    print(f"| predict.py, {script['texts']:,.0f} texts csv -> csv (after model load) | {script['seconds']:.1f} s |")
    print(f"| real tokens/s | {script['tokens_s'] / 1e3:,.1f}k |")
    print(f"| texts/s | {script['texts_s']:,.0f} |")
    print(f"| where the time went (main thread) | {script['where']} |")
    print(f"| model load / whole command | {script['load_s']:.1f} s / {script['wall_s']:.1f} s |")
    print(f"| API, one short text: p50 / p99 over {calls} calls | {api['p50_ms']:.1f} / {api['p99_ms']:.1f} ms |")
    print("| API stages, p50 ms | " + ", ".join(f"{k} {v:.2f}" for k, v in api["stages_p50_ms"].items()) + " |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_predict.json").write_text(json.dumps(
        {"device": name, "shape": shape, "script": script, "api": api, "extra": extra}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
