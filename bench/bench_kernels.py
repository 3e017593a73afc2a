"""Where the GPU time of a training step and of an evaluation goes (issue 13, goal 6: the full recipe in 5 minutes).

Runs the real train_lora.py in this process on the Qwen3-1.7B-shaped checkpoint (bench_gpu.py) and bench-length
texts, at the defaults except --cuda_graphs off (a graph replay hides its kernels from the profiler; the kernels
are the same), and profiles --profile_steps optimizer steps after --start steps, then the second evaluation (the
first captures and compiles). For each: GPU time per step (or per evaluation) by kind of kernel (GEMMs, flash
attention, Triton fusions, the rest), the top kernels, and every GEMM shape with its achieved TFLOP/s, beside the
bf16 matmul ceiling measured in the same process (bench_gpu.matmul_ceiling).

    python bench/bench_kernels.py --out bench/logs/kernels          # H200: ~3 min
    python bench/bench_kernels.py --eval_gap 18000                  # is evaluation GPU-bound? (~1.5 min)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gpu  # noqa: E402

# attention first: flash kernels' names hold "cutlass"; Triton kernels named after varlen_attn are the RoPE/norm
# fusions that feed it
KINDS = (("attention", re.compile(r"flash|fmha|attn", re.I)),
         ("GEMM", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|cublas|triton_tem_|_mm_", re.I)),
         ("Triton fusion", re.compile(r"^triton_", re.I)))
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm", "aten::_int_mm", "aten::linear")


def kind_of(name: str) -> str:
    return next((k for k, rx in KINDS if rx.search(name)), "other")


def dev_time(e, self_only: bool = False) -> float:
    """Microseconds on the device of a profiler event average (torch renamed cuda_* to device_*)."""
    for attr in (("self_device_time_total", "self_cuda_time_total") if self_only
                 else ("device_time_total", "cuda_time_total")):
        if hasattr(e, attr):
            return float(getattr(e, attr))
    return 0.0


def summarise(prof, units: int, unit: str, wall_s: float, ceiling: float) -> dict:
    """Kernel time by kind, top kernels, GEMMs by shape, per `unit` (steps or evaluations)."""
    # device-side ranges the profiler adds ("## Call CompiledFxGraph ... ##", "Optimizer.step#AdamW.step") span
    # kernels listed on their own: counting them too would count those kernels twice (run 29's log did)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and "#" not in e.key]
    total = sum(dev_time(e, True) for e in kernels)
    by_kind = defaultdict(float)
    for e in kernels:
        by_kind[kind_of(e.key)] += dev_time(e, True)
    top = sorted(kernels, key=lambda e: -dev_time(e, True))[:30]
    gemms = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in GEMM_OPS or not e.input_shapes:
            continue
        shapes = [s for s in e.input_shapes if s]
        flops = None
        if e.key in ("aten::mm", "aten::_int_mm", "aten::_scaled_mm") and len(shapes) >= 2 and len(shapes[0]) == 2:
            (m, k), n = shapes[0], shapes[1][-1]
            flops = 2 * m * k * n
        elif e.key == "aten::addmm" and len(shapes) >= 3 and len(shapes[1]) == 2:
            (m, k), n = shapes[1], shapes[2][-1]
            flops = 2 * m * k * n
        t = dev_time(e)
        gemms.append({"op": e.key, "shapes": shapes, "calls_per_unit": e.count / units, "us_per_unit": t / units,
                      "tflops": (flops * e.count / (t * 1e-6) / 1e12) if flops and t else None})
    gemms.sort(key=lambda g: -g["us_per_unit"])
    # every GEMM by what it belongs to: LoRA's have a dimension of the rank (8), the head's one of the labels (6)
    classes = defaultdict(lambda: {"us": 0.0, "calls": 0, "flops": 0.0})
    for g in gemms:
        dims = {d for shape in g["shapes"] for d in shape}
        c = classes["LoRA (a dimension of 8)" if 8 in dims else "head (a dimension of 6)" if 6 in dims
                    else "base model"]
        c["us"] += g["us_per_unit"]
        c["calls"] += g["calls_per_unit"]
        c["flops"] += (g["tflops"] or 0.0) * 1e12 * g["us_per_unit"] * 1e-6
    out = {"unit": unit, "units": units, "wall_ms_per_unit": 1e3 * wall_s / units,
           "gpu_ms_per_unit": total / units / 1e3,
           "by_kind_ms": {k: v / units / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
           "top_kernels": [{"name": e.key[:140], "calls_per_unit": e.count / units,
                            "us_per_unit": dev_time(e, True) / units, "kind": kind_of(e.key)} for e in top],
           "gemms": gemms[:40], "gemm_classes": dict(classes), "ceiling_tflops": ceiling / 1e12}
    print(f"\n### {unit}: wall {out['wall_ms_per_unit']:.1f} ms, GPU kernels {out['gpu_ms_per_unit']:.1f} ms per "
          f"{unit} (profiled over {units}; graphs off, so wall holds launch gaps that graphs remove)\n")
    print("| kind | ms per " + unit + " | share |\n|---|---|---|")
    for k, v in out["by_kind_ms"].items():
        print(f"| {k} | {v:.2f} | {v / out['gpu_ms_per_unit']:.1%} |")
    print(f"\n| kernel | kind | calls per {unit} | us per {unit} | share |\n|---|---|---|---|---|")
    for k in out["top_kernels"]:
        print(f"| {k['name'][:100]} | {k['kind']} | {k['calls_per_unit']:.0f} | {k['us_per_unit']:.0f} | "
              f"{k['us_per_unit'] / 1e3 / out['gpu_ms_per_unit']:.1%} |")
    print(f"\n| GEMMs of | calls per {unit} | ms per {unit} | TFLOP/s |\n|---|---|---|---|")
    for name, c in sorted(classes.items(), key=lambda kv: -kv[1]["us"]):
        print(f"| {name} | {c['calls']:.0f} | {c['us'] / 1e3:.2f} | "
              f"{c['flops'] / (c['us'] * 1e-6) / 1e12 if c['us'] else 0:.0f} |")
    print(f"\n| GEMM | shapes | calls per {unit} | us per {unit} | TFLOP/s (ceiling {ceiling / 1e12:.0f}) |"
          "\n|---|---|---|---|---|")
    for g in out["gemms"]:
        tf = f"{g['tflops']:.0f}" if g["tflops"] else "-"
        print(f"| {g['op']} | {g['shapes']} | {g['calls_per_unit']:.0f} | {g['us_per_unit']:.0f} | {tf} |")
    return out


def eval_gap(texts: int, row_tokens: list[int], repeats: int, out: Path) -> dict:
    """Is the product's evaluation GPU-bound? lft.predict.Predictor on the bench model (compiled layers, CUDA
    graphs: training's evaluation path) over `texts` bench texts, for each row budget: after two passes (compile,
    captures), the wall time of a pass against the GPU's busy time (CUDA events around every row's copy and
    replay) and the span from the first row's start to the last row's end, and the host's own seconds per pass
    in collating rows, in the row calls (copy, replay, slicing) and in gathering the result."""
    import numpy as np

    import lft.cuda_graphs as G
    import qwen3_classification_direct as qcd
    from lft import data as D
    from lft.predict import Predictor
    from lft.runtime import Runtime

    lens = bench_gpu.lengths(texts, 31)
    seqs = bench_gpu.texts_of(lens, 31)
    model = bench_gpu.build_ours().eval()
    qcd.compile_decoder_layers(model)
    rt = Runtime(device=bench_gpu.DEV, weight_dtype=torch.bfloat16, amp_dtype=torch.bfloat16, use_scaler=False,
                 precision="bf16", packing=True, attn=qcd.VARLEN, compile=True, eval_graphs=True, step_graphs=False)
    plain_call, plain_collate = G.RowGraphs.__call__, D.collate_packed_static
    host = {"collate": 0.0, "rows": 0.0}
    events: list = []

    def collate(*a, **k):
        t = time.perf_counter()
        r = plain_collate(*a, **k)
        host["collate"] += time.perf_counter() - t
        return r

    def call(self, inputs):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        e0.record()
        r = plain_call(self, inputs)
        e1.record()
        host["rows"] += time.perf_counter() - t
        events.append((e0, e1))
        return r

    results = {}
    for budget in row_tokens:
        pred = Predictor(model, rt, 151643, 256)
        batches = pred.batches(np.array(lens), max_tokens=budget)
        for _ in range(2):
            pred.probs(seqs, batches)
        walls = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            pred.probs(seqs, batches)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
        G.RowGraphs.__call__, D.collate_packed_static = call, collate
        try:
            host.update(collate=0.0, rows=0.0)
            events.clear()
            torch.cuda.synchronize()
            t = time.perf_counter()
            pred.probs(seqs, batches)
            torch.cuda.synchronize()
            wall_ev = time.perf_counter() - t
        finally:
            G.RowGraphs.__call__, D.collate_packed_static = plain_call, plain_collate
        busy = sum(a.elapsed_time(b) for a, b in events) / 1e3
        span = events[0][0].elapsed_time(events[-1][1]) / 1e3
        wall = sorted(walls)[len(walls) // 2]
        r = {"rows": len(batches), "tokens": sum(lens), "wall_s": wall, "walls": walls,
             "tokens_s": sum(lens) / wall, "instrumented_wall_s": wall_ev, "gpu_busy_s": busy, "gpu_span_s": span,
             "host_collate_s": host["collate"], "host_row_calls_s": host["rows"],
             "graphs": len(pred._graphs.graphs), "captures": pred._graphs.captures}
        results[str(budget)] = r
        print(f"eval gap, rows of {budget} tokens: {r['rows']} rows, wall {wall:.3f} s ({r['tokens_s'] / 1e3:.1f}k "
              f"tok/s; passes {', '.join(f'{w:.3f}' for w in walls)}); instrumented pass {wall_ev:.3f} s: GPU busy "
              f"{busy:.3f} s, span {span:.3f} s; host collate {host['collate']:.3f} s, row calls "
              f"{host['rows']:.3f} s; {r['graphs']} graphs", flush=True)
        # the same rows without graphs (compiled layers, real widths, no empty slots): a row's kernels are large
        # enough that the host stays ahead, so the wall is the GPU's time for the same work laid out eagerly
        eager_rt = dataclasses.replace(rt, eval_graphs=False)
        eager = Predictor(model, eager_rt, 151643, 256)
        for _ in range(2):
            eager.probs(seqs, batches)
        torch.cuda.synchronize()
        t = time.perf_counter()
        eager.probs(seqs, batches)
        torch.cuda.synchronize()
        r["eager_rows_wall_s"] = time.perf_counter() - t
        print(f"  the same rows without graphs: {r['eager_rows_wall_s']:.3f} s", flush=True)
        del pred, eager
    results["matmul"] = sustained_matmul(wall)
    (out / "eval_gap.json").write_text(json.dumps(results, indent=2))
    return results


def sustained_matmul(seconds: float) -> dict:
    """bf16 8192^3 matmuls back to back for `seconds` against the bench's ceiling (median of 10 single ones):
    does the GPU hold its clock through a GPU-bound pass as long as an evaluation?"""
    burst = bench_gpu.matmul_ceiling()
    n = 8192
    a, b = (torch.randn(n, n, device=bench_gpu.DEV, dtype=torch.bfloat16) for _ in range(2))
    torch.cuda.synchronize()
    count, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(50):
            a @ b
        count += 50
        torch.cuda.synchronize()
    rate = 2 * n ** 3 * count / (time.perf_counter() - t)
    print(f"matmul: burst {burst / 1e12:.0f} TFLOP/s, sustained over {seconds:.1f} s {rate / 1e12:.0f} TFLOP/s",
          flush=True)
    return {"burst_tflops": burst / 1e12, "sustained_tflops": rate / 1e12, "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--workdir", default="/tmp/lft_bench")
    p.add_argument("--train_texts", type=int, default=5400, help="150 optimizer steps of 36 texts")
    p.add_argument("--val_texts", type=int, default=3000)
    p.add_argument("--start", type=int, default=80, help="optimizer steps before the profiled ones")
    p.add_argument("--profile_steps", type=int, default=20)
    p.add_argument("--eval_gap", type=int, default=0, metavar="TEXTS",
                   help="instead: is evaluation GPU-bound? (wall against GPU busy time, on TEXTS bench texts)")
    p.add_argument("--eval_gap_rows", default="9216,18432", help="--eval_gap's row budgets, tokens")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    if args.eval_gap:
        eval_gap(args.eval_gap, [int(x) for x in args.eval_gap_rows.split(",")], args.repeats, out)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    from transformers import AutoTokenizer

    import train_lora

    ckpt = bench_gpu.build_checkpoint_folder(work / "qwen3-1.7b-shaped")
    tok = AutoTokenizer.from_pretrained(ckpt)
    train = bench_gpu.script_data(work, tok, args.train_texts, 30, f"kernels_train_{args.train_texts}")
    val = bench_gpu.script_data(work, tok, args.val_texts, 31, f"kernels_val_{args.val_texts}")
    ceiling = bench_gpu.matmul_ceiling()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    state = {"step": 0, "evals": 0, "prof": None, "t": 0.0}
    results = {}
    step_fn, eval_fn = train_lora.Trainer.train_step, train_lora.Trainer.run_eval

    def train_step(self, step, stop):
        state["step"] += 1
        if state["step"] == args.start + 1:
            torch.cuda.synchronize()
            state["prof"] = torch.profiler.profile(activities=acts, record_shapes=True)
            state["prof"].__enter__()
            state["t"] = time.perf_counter()
        r = step_fn(self, step, stop)
        if state["step"] == args.start + args.profile_steps:
            torch.cuda.synchronize()
            wall = time.perf_counter() - state["t"]
            state["prof"].__exit__(None, None, None)
            results["train"] = summarise(state["prof"], args.profile_steps, "optimizer step", wall, ceiling)
        return r

    def run_eval(self, step):
        state["evals"] += 1
        if state["evals"] != 2:
            return eval_fn(self, step)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            r = eval_fn(self, step)
            torch.cuda.synchronize()
        results["eval"] = summarise(prof, 1, f"evaluation of {args.val_texts:,} texts", time.perf_counter() - t,
                                    ceiling)
        return r

    train_lora.Trainer.train_step, train_lora.Trainer.run_eval = train_step, run_eval
    steps = args.train_texts // 36
    rc = train_lora.main(["--checkpoint", str(ckpt), "--train_data", str(train), "--val_data", str(val),
                          "--output_dir", str(work / "kernels_run"), "--num_epochs", "1", "--batch_size", "18",
                          "--learning_rate", "5e-5", "--max_length", "256", "--eval_steps", str(steps // 2 - 5),
                          "--save_total_limit", "1", "--no_progress", "--logging_steps", "20",
                          "--compile", "on", "--cuda_graphs", "off"])  # on: the small-job rule would drop it
    (out / "bench_kernels.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rc": rc,
                                                        **results}, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
