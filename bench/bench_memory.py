"""The original recipe on the cards users have: train_lora.py at its defaults (and --fp16) on the Qwen3-1.7B-shaped
checkpoint, each run in its own process capped with torch.cuda.set_per_process_memory_fraction to what a smaller
card holds. Reports real tokens/s (median of the log intervals after the first two, when new row shapes are
still being captured), peak allocated and reserved memory (reserved is what nvidia-smi shows, less the CUDA
context), the start-up line (the first run starts with a cold compile cache, the later ones warm), the memory
plan's note, and how a failing run ends. With --small_jobs: test_saved_lora.py on 3,000 texts with the uncapped
run's adapter, at auto flags and with --compile off --cuda_graphs off (wall time of the whole command).

    python bench/bench_memory.py [--steps 320] [--caps none,22,14] [--fp16] [--eager] [--older] [--small_jobs]
                                 [--out DIR]

--older runs the path auto picks on a GPU without bf16 or flash varlen attention (compute capability < 8.0, such as a
V100 or T4): --fp16 --attn_implementation sdpa (and so no CUDA graphs, which need varlen).
Every run takes the flags at their auto settings, as a user's does (before session 10 compile and CUDA graphs were
forced on, which overrode the memory plan's turning graphs off on a capped card).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import build_checkpoint_folder, script_data  # noqa: E402

CAPPED = """import os, sys, torch, runpy
cap = float(sys.argv[1])
if cap > 0:
    torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
if os.environ.get("LFT_OOM_SUMMARY"):
    sys.path.insert(0, "bench")
    import bench_memory
    bench_memory.summarise_on_oom()
sys.argv = ["train_lora.py"] + sys.argv[2:]
runpy.run_path("train_lora.py", run_name="__main__")
"""


def summarise_on_oom() -> None:
    """In a training run: record allocation stacks, and at an out-of-memory error print to stderr what holds the
    memory at that moment: allocated bytes by pool (the CUDA graphs' private pool or the default one) and by the
    innermost frame of this project's code that allocated them (top 15)."""
    import collections
    import torch

    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")

    def observer(device, alloc, device_alloc, device_free):
        try:
            summarise(alloc)
        except Exception as e:  # a diagnostic must not hide the error it diagnoses
            print(f"OOM SUMMARY failed: {type(e).__name__}: {e}", file=sys.stderr)

    def summarise(alloc):
        snap = torch.cuda.memory._snapshot()
        by_pool, by_site = collections.Counter(), collections.Counter()
        for seg in snap["segments"]:
            pool = "graph pool" if seg.get("segment_pool_id", (0, 0)) != (0, 0) else "default pool"
            for b in seg["blocks"]:
                if b["state"] != "active_allocated":
                    by_pool[pool + " (free)"] += b["size"]
                    continue
                by_pool[pool] += b["size"]
                frames = b.get("frames") or []
                ours = [f for f in frames if any(k in f["filename"] for k in ("train_lora", "lft/", "qwen3_class"))]
                f = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
                by_site[f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}"] += b["size"]
        print(f"OOM SUMMARY: tried to allocate {alloc / 2**20:.0f} MiB", file=sys.stderr)
        for k, v in by_pool.most_common():
            print(f"OOM SUMMARY pool: {k}: {v / 2**30:.2f} GiB", file=sys.stderr)
        for k, v in by_site.most_common(15):
            print(f"OOM SUMMARY site: {v / 2**30:.2f} GiB  {k}", file=sys.stderr)
        sys.stderr.flush()
    torch._C._cuda_attach_out_of_memory_observer(observer)


def one_run(name: str, cap: float, ckpt: Path, train: Path, val: Path, work: Path, flags: list[str],
            torch_logs: str = "", log: Path | None = None, oom_summary: bool = False) -> dict:
    out = work / f"mem_{name}"
    t = time.perf_counter()
    env = dict(os.environ, TORCH_LOGS=torch_logs) if torch_logs else dict(os.environ)
    if oom_summary:
        env["LFT_OOM_SUMMARY"] = "1"
    r = subprocess.run([sys.executable, "-c", CAPPED, str(cap), "--checkpoint", str(ckpt), "--train_data", str(train),
                        "--val_data", str(val), "--output_dir", str(out), "--num_epochs", "1", "--no_progress",
                        "--logging_steps", "20", "--eval_steps", "100000", "--batch_size", "18",
                        "--max_length", "256", *flags],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if log is not None:  # every run's stderr (with --torch_logs: dynamo's timestamped compile lines, recompiles)
        with log.open("a") as f:
            f.write(f"===== {name} (rc {r.returncode})\n{r.stderr}\n")
    logs = []
    if (out / "metrics.jsonl").is_file():
        logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "tokens_per_s" in r]
    late = steps[2:] or steps
    mid = sorted(late, key=lambda x: x["tokens_per_s"])[len(late) // 2] if steps else {}
    ready = next((line for line in r.stdout.splitlines() if line.startswith("ready in")), "")
    plan = next((line for line in r.stdout.splitlines() if line.startswith("note: memory:")), "")
    row = {"run": name, "cap_gib": cap or None, "flags": " ".join(flags) or "defaults", "rc": r.returncode,
           "wall_s": round(wall, 1), "tokens_s": mid.get("tokens_per_s"), "ready": ready, "plan": plan,
           "peak_alloc_gib": max((x.get("peak_alloc_gib", 0) for x in steps), default=None),
           "peak_reserved_gib": max((x.get("peak_reserved_gib", 0) for x in steps), default=None),
           "error": error_line(r.stderr) if r.returncode else ""}
    print(json.dumps(row, ensure_ascii=False), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=320, help="optimizer steps per run (36 texts each; 320 steps are "
                   "~875k real tokens, over the small-job rule's 750k: the runs make the decisions a full-sized job "
                   "makes, compile, CUDA graphs and the memory plan's, at their auto settings)")
    p.add_argument("--caps", default="none,22,14", help="GiB caps to run the defaults under ('none': uncapped)")
    p.add_argument("--capped_flags", default="", help="flag sets separated by ';', each run under every cap beside "
                   "the defaults (e.g. ';--cuda_graphs off': the defaults, then without training graphs)")
    p.add_argument("--fp16", action="store_true", help="also run --fp16 uncapped")
    p.add_argument("--eager", action="store_true", help="also run --compile off (CUDA graphs still on) uncapped")
    p.add_argument("--older", action="store_true", help="also run --fp16 --attn_implementation sdpa uncapped (what "
                   "auto picks on a GPU of compute capability < 8.0)")
    p.add_argument("--small_jobs", action="store_true", help="also time test_saved_lora.py on 3,000 texts")
    p.add_argument("--torch_logs", default="", help="TORCH_LOGS for the training runs (e.g. dynamo,recompiles); "
                   "every run's stderr goes to --out/runs_stderr.txt")
    p.add_argument("--oom_summary", action="store_true", help="capped runs record allocation stacks and, on an "
                   "out-of-memory error, print what holds the memory (runs_stderr.txt)")
    p.add_argument("--workdir", default="/tmp/lft_bench")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    work, out = Path(args.workdir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs_stderr.txt"
    log.unlink(missing_ok=True)
    ckpt = build_checkpoint_folder(work / "qwen3-1.7b-shaped")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    train = script_data(work, tok, args.steps * 36, 40, "mem_train")
    val = script_data(work, tok, 360, 41, "mem_val")
    rows = []
    sets = [x.split() for x in args.capped_flags.split(";")] if args.capped_flags else [[]]
    for cap in args.caps.split(","):
        c = 0.0 if cap == "none" else float(cap)
        for flags in sets:
            name = f"defaults_cap{cap}" if not flags else f"cap{cap}_" + "_".join(x.lstrip("-") for x in flags)
            rows.append(one_run(name, c, ckpt, train, val, work, flags, args.torch_logs, log, args.oom_summary))
            (out / "bench_memory.json").write_text(json.dumps(rows, indent=2))
    for flag, extra in (("fp16", ["--fp16"]), ("eager", ["--compile", "off"]),
                        ("older", ["--fp16", "--attn_implementation", "sdpa"])):
        if getattr(args, flag):
            rows.append(one_run(flag, 0.0, ckpt, train, val, work, extra, args.torch_logs, log))
            (out / "bench_memory.json").write_text(json.dumps(rows, indent=2))
    small = []
    if args.small_jobs:
        model = work / "mem_defaults_capnone" / "best_model"
        test = script_data(work, tok, 3000, 42, "small_test")
        for name, flags in (("auto", []), ("compile off, graphs off", ["--compile", "off", "--cuda_graphs", "off"])):
            small.append(small_job(name, model, ckpt, test, work, flags))
            (out / "bench_memory.json").write_text(json.dumps({"train": rows, "small_jobs": small}, indent=2))
    print("\n| run | cap GiB | rc | real tokens/s | peak alloc GiB | peak reserved GiB | wall s | ready | plan |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tps = f"{r['tokens_s'] / 1e3:.1f}k" if r["tokens_s"] else "-"
        print(f"| {r['flags']} | {r['cap_gib'] or '-'} | {r['rc']} | {tps} | {r['peak_alloc_gib'] or '-'} | "
              f"{r['peak_reserved_gib'] or '-'} | {r['wall_s']} | {r['ready'] or r['error']} | {r['plan']} |")
    if small:
        print("\n| test_saved_lora.py, 3,000 texts | rc | wall s |\n|---|---|---|")
        for r in small:
            print(f"| {r['run']} | {r['rc']} | {r['wall_s']} |")
    return 0


def error_line(stderr: str) -> str:
    """The script's own `error: ...` line, else stderr's last line (a library warning can come after the error)."""
    lines = stderr.strip().splitlines() or [""]
    return next((x for x in reversed(lines) if x.startswith("error")), lines[-1])[:400]


def small_job(name: str, model: Path, ckpt: Path, test: Path, work: Path, flags: list[str]) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "test_saved_lora.py", "--lora_model", str(model), "--checkpoint", str(ckpt),
                        "--test_data", str(test), "--output_dir", str(work / f"small_{len(flags)}"),
                        "--no_progress", *flags], capture_output=True, text=True)
    row = {"run": name, "rc": r.returncode, "wall_s": round(time.perf_counter() - t, 1),
           "stdout_tail": r.stdout[-1500:], "error": error_line(r.stderr) if r.returncode else ""}
    print(json.dumps(row, ensure_ascii=False), flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
