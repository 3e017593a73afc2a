"""Issue 13's rows in one call: the original recipe on the cards users have, start-up, small jobs, the full recipe.

Runs the other bench scripts as lanes, one lane per visible GPU, and prints one table, goal by goal, beside the
original recipe's own training step and evaluation. With two GPUs the whole table fits one device call (~9 min);
with one, the lanes run one after the other (~16 min).

    python bench/bench_all.py [--out DIR] [--deadline SECONDS] [--steps 320]

  before   `--help` of every script, timed (goal: <= 1 s)
  lane A   bench_gpu.py --full_recipe          the original full recipe end to end, from launch (goal 6)
           bench_gpu.py --quick --skip ours    the original recipe's own step and evaluation (fp32 weights, fp16
                                               autocast, padded to 256) and the bf16 matmul ceiling, for MFU
  lane B   bench_memory.py --caps none,22,14 --fp16 --older
                                               the original recipe's training at its defaults uncapped and capped
                                               at 22 and 14 GiB, --fp16, and the older-GPU path (--fp16, varlen
                                               attention off) (goals 1-3); 320 steps each, a job large enough for
                                               the auto settings to compile and capture graphs
           bench_startup.py --train            launch to the first optimizer step, cold and warm (goal 4), while
                                               lane A trains (its CPU-heavy start is over by then)
           bench_startup.py --small_jobs       test_saved_lora.py on 3,000 texts: auto, and compile / CUDA graphs
                                               off (goal 5)

Each step runs in its own process with the lane's GPU, under what is left of --deadline: a step that does not
finish in time is stopped and its rows say so; the table prints what finished. Every lane has its own work
folder (the scripts write their data files there) around one shared Qwen3-1.7B-shaped checkpoint. Writes
bench_all.json and each step's log (lane_*.log, and each script's own JSON in its folder) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("train_lora.py", "test_saved_lora.py", "predict.py", "serve.py", "get_data_by_labels.py", "load_model.py")


def lanes(out: Path, steps: int) -> dict[str, list[tuple[str, list[str]]]]:
    py, b = sys.executable, str(REPO / "bench")
    return {
        "A": [("full", [py, f"{b}/bench_gpu.py", "--full_recipe", "--out", str(out / "full")]),
              ("ref", [py, f"{b}/bench_gpu.py", "--quick", "--skip", "ours", "--out", str(out / "ref")])],
        "B": [("memory", [py, f"{b}/bench_memory.py", "--steps", str(steps), "--caps", "none,22,14", "--fp16",
                          "--older", "--out", str(out / "memory")]),
              ("firststep", [py, f"{b}/bench_startup.py", "--train", "--out", str(out / "firststep")]),
              ("small", [py, f"{b}/bench_startup.py", "--small_jobs", "--runs", "2", "--out", str(out / "small")])],
    }


def time_help() -> dict[str, float]:
    """Wall seconds of `SCRIPT --help`, the second of two runs (the first may compile bytecode, which an installed
    environment already has); None where it failed."""
    times = {}
    for script in SCRIPTS:
        for _ in range(2):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True)
            times[script] = round(time.perf_counter() - t, 2) if r.returncode == 0 else None
    return times


def run_lane(name: str, steps: list[tuple[str, list[str]]], gpu: str | None, work: Path, out: Path,
             deadline: float, status: dict) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    for step, cmd in steps:
        left = deadline - time.monotonic()
        if left < 30:
            status[step] = {"rc": None, "seconds": 0, "note": "not started: the deadline came first"}
            continue
        t = time.monotonic()
        with open(out / f"lane_{name}_{step}.log", "w") as log:
            p = subprocess.Popen([*cmd, "--workdir", str(work)], cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = p.wait(timeout=left)
                note = ""
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                rc, note = p.wait(), f"stopped at the deadline after {left:.0f} s"
        status[step] = {"rc": rc, "seconds": round(time.monotonic() - t, 1), "note": note}
        print(f"lane {name}: {step} rc {rc} after {status[step]['seconds']} s {note}", flush=True)


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(x, unit="", nd=1):
    return "-" if x is None else f"{x:,.{nd}f}{unit}"


def table(out: Path, helps: dict, status: dict) -> list[dict]:
    """One row per measurement: goal, what, measured, target, met (True/False/None where it cannot be judged)."""
    from bench_gpu import N_PARAMS  # non-embedding parameters of the Qwen3-1.7B shape (MFU: 4 N per token)

    rows = []

    def row(goal, what, measured, target="", met=None):
        rows.append({"goal": goal, "what": what, "measured": measured, "target": target, "met": met})

    ref = load(out / "ref" / "bench_results.json") or {}
    ceiling = ref.get("ceiling")
    by_recipe = {r["recipe"]: r for r in ref.get("rows", [])}
    orig_tr = by_recipe.get("original: fp32 + fp16 autocast, pad 256, batch 18")
    orig_ev = by_recipe.get("eval original: fp32 + fp16 autocast, pad 256, batch 18")
    mem = load(out / "memory" / "bench_memory.json")
    mem = mem.get("train", []) if isinstance(mem, dict) else (mem or [])
    runs = {r["run"]: r for r in mem}
    base = runs.get("defaults_capnone", {})
    base_tps = base.get("tokens_s")
    mfu = (lambda tps: 4 * N_PARAMS * tps / ceiling if tps and ceiling else None)

    if orig_tr:
        row("-", "original recipe's training step (fp32 weights, fp16 autocast, padded to 256, batch 18)",
            f"{orig_tr['tokens_s'] / 1e3:.1f}k real tokens/s, MFU {100 * orig_tr['mfu']:.1f}%")
    if orig_ev:
        row("-", "original recipe's evaluation", f"{orig_ev['tokens_s'] / 1e3:.1f}k real tokens/s")
    if base:
        speedup = f", {base_tps / orig_tr['tokens_s']:.1f}x the original" if base_tps and orig_tr else ""
        row("1", "train_lora.py, original recipe's flags, uncapped",
            f"{fmt(base_tps and base_tps / 1e3, 'k')} real tokens/s{speedup}; peak allocated "
            f"{fmt(base.get('peak_alloc_gib'), ' GiB')}, reserved {fmt(base.get('peak_reserved_gib'), ' GiB')}")
    for cap, target in (("22", 0.8), ("14", None)):
        r = runs.get(f"defaults_cap{cap}")
        if r is None:
            row("1", f"capped at {cap} GiB", "not run", "")
            continue
        tps = r.get("tokens_s")
        ratio = tps / base_tps if tps and base_tps else None
        if r["rc"] == 0:
            meas = (f"completed, {fmt(tps and tps / 1e3, 'k')} real tokens/s ({fmt(ratio, 'x', 2)} uncapped); peak "
                    f"allocated {fmt(r.get('peak_alloc_gib'), ' GiB')}, reserved "
                    f"{fmt(r.get('peak_reserved_gib'), ' GiB')}" + (f"; {r['plan']}" if r.get("plan") else ""))
        else:
            meas = f"stopped after {r['wall_s']} s: {r.get('error', '')}"
        if target:
            row("1", f"capped at {cap} GiB (a 24 GB card)", meas, ">= 0.8x uncapped",
                r["rc"] == 0 and ratio is not None and ratio >= target)
        else:
            row("1", f"capped at {cap} GiB (a 16 GB card)", meas, "completes, or stops within 10 s naming a flag",
                r["rc"] == 0 or (r["wall_s"] <= 10 and "--" in r.get("error", "")))
    fp16 = runs.get("fp16")
    if fp16:
        ratio = fp16["tokens_s"] / base_tps if fp16.get("tokens_s") and base_tps else None
        row("2", "--fp16", f"rc {fp16['rc']}, {fmt(fp16.get('tokens_s') and fp16['tokens_s'] / 1e3, 'k')} real "
            f"tokens/s ({fmt(ratio, 'x', 2)} bf16)", ">= 0.8x bf16", ratio is not None and ratio >= 0.8)
    older = runs.get("older")
    if older:
        row("3", "older-GPU path (--fp16, varlen attention off: sdpa)", f"rc {older['rc']}, "
            f"{fmt(older.get('tokens_s') and older['tokens_s'] / 1e3, 'k')} real tokens/s"
            + (f"; {older['error']}" if older["rc"] else ""), "works", older["rc"] == 0)
    first = load(out / "firststep" / "bench_startup.json") or {}
    for r in first.get("rows", []):
        target = 20 if r["cache"] == "cold" else 10
        row("4", f"first optimizer step, compile cache {r['cache']}", f"{r['seconds']} s ({r['ready']})",
            f"<= {target} s", r["seconds"] <= target)
    if helps:
        slow = max((t for t in helps.values() if t is not None), default=None)
        row("4", "--help of every script", ", ".join(f"{k} {fmt(v, ' s', 2)}" for k, v in helps.items()),
            "<= 1 s", slow is not None and slow <= 1.0 and None not in helps.values())
    small = load(out / "small" / "bench_startup.json") or {}
    walls = {}
    for r in small.get("rows", []):
        walls.setdefault(r["flags"], []).append(r["seconds"])
    if walls:
        med = {k: statistics.median(v) for k, v in walls.items()}
        auto, off = med.get("auto"), med.get("--compile off --cuda_graphs off")
        row("5", "test_saved_lora.py on 3,000 texts, wall (median)",
            "; ".join(f"{k} {v:.1f} s ({', '.join(map(str, walls[k]))})" for k, v in med.items()),
            "<= 10 s, and auto never slower than compile/graphs off",
            auto is not None and off is not None and auto <= 10 and auto <= off)
    full = load(out / "full" / "full_recipe.json")
    if full:
        row("6", "original full recipe (45,000 x 3 epochs, 18,000 validation texts every 200 steps), from launch",
            f"rc {full['rc']}, {full['wall_s'] / 60:.2f} min; evaluations {full['eval_s']:.0f} s; peak allocated "
            f"{full['peak_alloc_gib']:.1f} GiB, reserved {full['peak_reserved_gib']:.1f} GiB", "<= 5 min",
            full["rc"] == 0 and full["wall_s"] <= 300)
        m = mfu(full.get("train_tokens_s_median"))
        row("6", "steady-state training in the full recipe (median of its log intervals)",
            f"{full['train_tokens_s_median'] / 1e3:.1f}k real tokens/s, MFU {fmt(m and 100 * m, '%')}"
            + (f" (ceiling {ceiling / 1e12:.0f} TFLOP/s)" if ceiling else ""), ">= 45% MFU (stretch 55%)",
            None if m is None else m >= 0.45)
    for step, s in status.items():
        if s["rc"] != 0:
            row("-", f"step {step}", f"rc {s['rc']} after {s['seconds']} s {s['note']}".strip(), "", False)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_all_out"))
    p.add_argument("--workdir", default="/tmp/lft_bench")
    p.add_argument("--deadline", type=float, default=3000, help="seconds from now by which every step must end")
    p.add_argument("--steps", type=int, default=320, help="optimizer steps of each bench_memory.py run")
    args = p.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.deadline
    out, work = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    helps = time_help()
    print(f"--help: {helps}", flush=True)
    sys.path.insert(0, str(REPO / "bench"))
    sys.path.insert(0, str(REPO))
    import torch

    import bench_gpu

    ckpt = bench_gpu.build_checkpoint_folder(work / "qwen3-1.7b-shaped")  # once, shared by the lanes
    gpus = [str(i) for i in range(torch.cuda.device_count())]
    print(f"{len(gpus)} GPU(s): {torch.cuda.get_device_name() if gpus else '-'}; checkpoint ready after "
          f"{time.monotonic() - start:.0f} s", flush=True)
    plan = lanes(out, args.steps)
    if len(gpus) < 2:  # one GPU (or none): the lanes one after the other
        plan = {"A": plan["A"] + plan["B"]}
    status: dict = {}
    threads = []
    for i, (name, steps) in enumerate(plan.items()):
        lane_work = work / f"lane_{name}"
        lane_work.mkdir(exist_ok=True)
        link = lane_work / "qwen3-1.7b-shaped"
        if not link.exists():
            link.symlink_to(ckpt.resolve(), target_is_directory=True)
        th = threading.Thread(target=run_lane, args=(name, steps, gpus[i] if gpus else None, lane_work, out,
                                                     deadline, status))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    rows = table(out, helps, status)
    device = torch.cuda.get_device_name() if gpus else "CPU"
    print(f"\nIssue 13, on {device} ({len(gpus)} GPU(s), {len(plan)} lane(s)), "
          f"{time.monotonic() - start:.0f} s in all\n")
    print("| goal | what | measured | target | met |\n|---|---|---|---|---|")
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        print(f"| {r['goal']} | {r['what']} | {r['measured']} | {r['target']} | {met} |")
    # the scripts' own results too: one file carries the call (a device call returns a limited number of files)
    sources = {name: load(out / name / f) for name, f in (("full", "full_recipe.json"), ("ref", "bench_results.json"),
                                                          ("memory", "bench_memory.json"),
                                                          ("firststep", "bench_startup.json"),
                                                          ("small", "bench_startup.json"))}
    (out / "bench_all.json").write_text(json.dumps({"device": device, "gpus": len(gpus), "help_s": helps,
                                                    "steps": status, "rows": rows, "sources": sources}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
