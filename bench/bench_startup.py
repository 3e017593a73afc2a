"""Start-up benchmark (issue 13, goal 5, small jobs): where the wall time of a one-off test_saved_lora.py goes.

test_saved_lora.py runs as a child process, --compile off --cuda_graphs off, on --texts texts of bench_gpu.py's
length distribution, with a random adapter (bench_predict.py) on the Qwen3-1.7B-shaped random checkpoint
(bench_gpu.py). The child imports the libraries first, one at a time, then times each phase by wrapping the
functions that make it (so no phase holds import time); the parent times the whole command and the exit.

    python bench/bench_startup.py                      # on the GPU if there is one, else the CPU
    python bench/bench_startup.py --runs 3 --stub_eval # evaluation replaced by random probabilities (the rest)
    python bench/bench_startup.py -- --bf16            # flags after -- go to test_saved_lora.py
    python bench/bench_startup.py --runs 3 --settings "--compile auto --cuda_graphs auto;--cuda_graphs on"
                                                       # phases of two settings, run in turn
    python bench/bench_startup.py --small_jobs         # the whole command's wall time: auto flags, then eager
    python bench/bench_startup.py --train              # train_lora.py: launch to first optimizer step
    python bench/bench_startup.py --train --compile_thread_ab --runs 2
                                                       # then cold and warm with its compile thread on and off

--small_jobs: test_saved_lora.py at its auto flags, with --compile off --cuda_graphs off (issue 13, goal 5: auto
must never be slower) and with --compile off --cuda_graphs on (graphs without compiling: do they pay on a small
job?), --runs times each, in turn, whole-command wall time from launch to exit.
--train: train_lora.py on the original recipe's data (45,000 training and 18,000 validation texts of the bench
distribution) at its defaults, from launch until the log line of optimizer step 1 (then stopped), first with empty
compile caches (cold), then with the caches that run left (warm); reports its "ready in" line too (goal 4).

Prints a markdown table (median of the runs) and writes bench_startup.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMPORTS = ("torch", "qwen3_classification_direct", "transformers:AutoTokenizer", "pandas", "sklearn.metrics",
           "matplotlib.pyplot", "openpyxl")
PHASES = (("lft.base", "check_folder"), ("qwen3_classification_direct", "load_backbone"),
          ("lft.base", "identity"), ("lft.base", "tensor_checksums"), ("qwen3_classification_direct", "load_tokenizer"),
          ("lft.adapter", "load_adapter_weights"), ("lft.adapter", "load_classifier"), ("lft.data", "load_split"),
          ("lft.data", "tokenize_split"), ("lft.predict", "Predictor.probs"), ("lft.metrics", "plot_confusion"),
          ("lft.tables", "write_table"), ("test_saved_lora", "write_outputs"), ("test_saved_lora", "main"))


def child(argv: list[str], stub_eval: bool) -> None:
    """test_saved_lora.main(argv) with every phase timed; the times go to stderr as one JSON line."""
    import functools
    import importlib

    sys.path.insert(0, str(REPO))
    times = {}
    for name in IMPORTS:
        module, _, attr = name.partition(":")
        t = time.perf_counter()
        m = importlib.import_module(module)
        if attr:
            getattr(m, attr)
        times[f"import {name}"] = time.perf_counter() - t
    import torch

    def timed(label, f):
        @functools.wraps(f)
        def g(*a, **k):  # no synchronising: the phases that queue GPU work end with a transfer to the CPU
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                times[label] = times.get(label, 0.0) + time.perf_counter() - t
        return g
    for module, name in PHASES:
        owner = importlib.import_module(module)
        *cls, fn = name.split(".")
        owner = getattr(owner, cls[0]) if cls else owner
        setattr(owner, fn, timed(name, getattr(owner, fn)))
    if stub_eval:
        from lft.predict import Predictor

        def random_probs(self, input_ids, batches):
            import itertools

            import numpy as np

            g = torch.Generator().manual_seed(0)
            idx = np.fromiter(itertools.chain.from_iterable(batches), dtype=np.int64)
            return idx, torch.softmax(torch.randn(len(idx), 6, generator=g), -1)
        Predictor.probs = timed("Predictor.probs", random_probs)
    import test_saved_lora

    rc = test_saved_lora.main(argv)
    print(json.dumps({"rc": rc, "times": times, "end": time.time()}), file=sys.stderr, flush=True)
    import gc

    gc.freeze()  # as lft.common.exit_script does, where the script has it


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=3000)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--stub_eval", action="store_true", help="random probabilities instead of the model's")
    p.add_argument("--workdir", default="/tmp/lft_bench")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where bench_startup.json goes")
    p.add_argument("--small_jobs", action="store_true", help="whole-command wall time, auto flags vs eager")
    p.add_argument("--train", action="store_true", help="train_lora.py from launch to its first optimizer step")
    p.add_argument("--profile", action="store_true", help="with --train: a third, warm run's set-up under cProfile")
    p.add_argument("--compile_thread_ab", action="store_true",
                   help="with --train: then --runs rounds of cold and warm runs with train_lora.py's compile-ahead "
                   "thread on and off, in alternating order, each variant with caches of its own (one machine, so "
                   "machines do not differ between the two)")
    p.add_argument("--settings", default="", help="flag sets separated by ';', each run in turn after the default "
                   "--compile off --cuda_graphs off (e.g. '--compile auto --cuda_graphs auto;--cuda_graphs on')")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, extra = p.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    if args.child:
        child(extra, args.stub_eval)
        return 0
    import torch

    if args.train or args.small_jobs:
        return whole_commands(args, extra)

    sys.path.insert(0, str(REPO / "bench"))
    import bench_gpu
    from bench_predict import random_adapter
    from transformers import AutoTokenizer

    bench_gpu.DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the random init runs
    work = Path(args.workdir)
    ckpt = bench_gpu.build_checkpoint_folder(work / "qwen3-1.7b-shaped")
    adapter = random_adapter(ckpt, work / "full" / "random_adapter")
    data = bench_gpu.script_data(work, AutoTokenizer.from_pretrained(ckpt), args.texts, 40, f"startup_{args.texts}")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *(["--stub_eval"] if args.stub_eval else []),
           "--lora_model", str(adapter), "--checkpoint", str(ckpt), "--test_data", str(data),
           "--output_dir", str(work / "startup_eval"), "--no_progress", "--compile", "off", "--cuda_graphs", "off",
           *extra]
    settings = [s.split() for s in args.settings.split(";")] if args.settings else [[]]
    runs = []
    for i in range(args.runs * len(settings)):  # with --settings: each in turn, --runs times
        flags = settings[i % len(settings)]
        t = time.perf_counter()
        r = subprocess.run([*cmd, *flags], capture_output=True, text=True, env=child_env())
        wall, ended = time.perf_counter() - t, time.time()
        if r.returncode != 0:
            raise SystemExit(f"test_saved_lora.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
        res = json.loads(r.stderr.strip().splitlines()[-1])
        runs.append({"setting": " ".join(flags), **res["times"], "interpreter exit": ended - res["end"],
                     "wall": wall})
        print(json.dumps(runs[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\ntest_saved_lora.py, {args.texts:,} texts, Qwen3-1.7B-shaped on {device}, {' '.join(extra) or 'defaults'}"
          f"{', evaluation stubbed' if args.stub_eval else ''}; median of {args.runs} run(s), seconds\n")
    names = [" ".join(f) for f in settings]
    print("| phase | " + " | ".join(n or "s" for n in names) + " |\n|---" + "|---" * len(names) + "|")
    for key in runs[0]:
        if key != "setting":
            print(f"| {key} | " + " | ".join(
                f"{statistics.median(r.get(key, 0.0) for r in runs if r['setting'] == n):.2f}" for n in names) + " |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_startup.json").write_text(json.dumps(
        {"device": device, "texts": args.texts, "stub_eval": args.stub_eval, "extra": extra, "runs": runs}, indent=2))
    return 0


# train_lora.py with its compile-ahead thread (train_lora.warm_compile) left on or turned off: both variants start
# through this same wrapper, so they pay the same start-up
AB_SETUP = """import sys
import train_lora
if sys.argv[1] == "off":
    train_lora.warm_compile = lambda args, rt: None
sys.exit(train_lora.main(sys.argv[2:]))
"""


PROFILED_SETUP = """import cProfile, os, sys
prof = cProfile.Profile()
prof.enable()
import train_lora
def fit(self, stop):
    prof.disable()
    prof.dump_stats(sys.argv[1])
    print("PROFILED", flush=True)
    os._exit(0)
train_lora.Trainer.fit = fit
train_lora.main(sys.argv[2:])
"""


def child_env(**extra) -> dict:
    """The environment with this repository first on PYTHONPATH (what was there stays: carried wheels)."""
    path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", **extra)


def timed_command(cmd: list[str], env: dict, stop_at: str | None = None) -> dict:
    """Run `cmd`; the seconds from launch to each of its stdout lines that matter, and to its exit (or, with
    `stop_at`, to the first line starting with it, where the command is then killed)."""
    import signal

    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    seen, ready, lines = None, "", []
    for line in p.stdout:
        lines.append(line.rstrip())
        if line.startswith("ready in"):
            ready = line.strip()
        if stop_at and line.startswith(stop_at):
            seen = time.perf_counter() - t
            os.killpg(p.pid, signal.SIGKILL)
            break
    p.stdout.close()
    stderr = p.stderr.read()
    rc = p.wait()
    wall = time.perf_counter() - t
    if stop_at and seen is None or not stop_at and rc != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed ({rc}):\n" + "\n".join(lines[-20:]) + stderr[-3000:])
    return {"seconds": round(seen if stop_at else wall, 2), "ready": ready}


def whole_commands(args, extra) -> int:
    import tempfile

    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import bench_gpu
    from bench_predict import random_adapter
    from transformers import AutoTokenizer

    bench_gpu.DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.workdir)
    ckpt = bench_gpu.build_checkpoint_folder(work / "qwen3-1.7b-shaped")
    tok = AutoTokenizer.from_pretrained(ckpt)
    rows = []
    if args.small_jobs:
        adapter = random_adapter(ckpt, work / "full" / "random_adapter")
        data = bench_gpu.script_data(work, tok, args.texts, 40, f"startup_{args.texts}")
        base = [sys.executable, "test_saved_lora.py", "--lora_model", str(adapter), "--checkpoint", str(ckpt),
                "--test_data", str(data), "--no_progress", *extra]
        settings = (("auto", []), ("--compile off --cuda_graphs off", ["--compile", "off", "--cuda_graphs", "off"]),
                    ("--compile off --cuda_graphs on", ["--compile", "off", "--cuda_graphs", "on"]))
        for i in range(args.runs):  # in turn, so no setting always runs first
            for k, (name, flags) in enumerate(settings[i % 3:] + settings[:i % 3]):
                r = timed_command([*base, "--output_dir", str(work / f"small_{k}_{i}"), *flags], child_env())
                rows.append({"job": f"test_saved_lora.py, {args.texts:,} texts", "flags": name, "cache": "-",
                             "seconds": r["seconds"], "what": "wall, launch to exit", "ready": ""})
                print(json.dumps(rows[-1]), flush=True)
    if args.train:
        cache = Path(tempfile.mkdtemp(prefix="lft_startup_cache_"))
        env = child_env(TORCHINDUCTOR_CACHE_DIR=str(cache), TRITON_CACHE_DIR=str(cache / "triton"))
        for i, label in enumerate(("cold", "warm")):
            cmd = bench_gpu.original_recipe(ckpt, work, work / f"startup_train_{i}", tok, "--logging_steps", "1",
                                            *extra)
            r = timed_command(cmd, env, stop_at="step 1/")
            rows.append({"job": "train_lora.py, original recipe (45,000 + 18,000 texts)", "flags": "defaults",
                         "cache": label, "seconds": r["seconds"], "what": "launch to step 1's log line",
                         "ready": r["ready"]})
            print(json.dumps(rows[-1]), flush=True)
        if args.profile:  # a third, warm run under cProfile from its first line to the end of set-up
            prof = Path(args.out) / "train_setup_warm.prof"
            prof.parent.mkdir(parents=True, exist_ok=True)
            timed_command([sys.executable, "-c", PROFILED_SETUP, str(prof), *cmd[2:]], env, stop_at="PROFILED")
            from bench_compile import print_profile

            print_profile(prof)
        if args.compile_thread_ab:
            for i in range(args.runs):
                for variant in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    cache = Path(tempfile.mkdtemp(prefix=f"lft_startup_ab_{variant}_"))
                    env = child_env(TORCHINDUCTOR_CACHE_DIR=str(cache), TRITON_CACHE_DIR=str(cache / "triton"))
                    for label in ("cold", "warm"):
                        cmd = bench_gpu.original_recipe(ckpt, work, work / f"startup_ab_{variant}_{i}_{label}", tok,
                                                        "--logging_steps", "1", *extra)
                        r = timed_command([sys.executable, "-c", AB_SETUP, variant, *cmd[2:]], env,
                                          stop_at="step 1/")
                        rows.append({"job": "train_lora.py, original recipe (45,000 + 18,000 texts)",
                                     "flags": f"compile thread {variant}", "cache": label, "seconds": r["seconds"],
                                     "what": "launch to step 1's log line", "ready": r["ready"]})
                        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\nOn {device}; seconds\n\n| job | flags | compile cache | s | measured | ready line |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['job']} | {r['flags']} | {r['cache']} | {r['seconds']} | {r['what']} | {r['ready']} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_startup.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
