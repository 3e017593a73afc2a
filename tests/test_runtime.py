"""Runtime decisions from flags and the machine, with the GPU's capabilities faked: what an older GPU (no bf16,
no flash attention: V100, T4) gets, and what an H100/H200 gets. No GPU needed."""
import argparse

import pytest
import torch

from lft import runtime as R
from lft.common import UserError


def flags(**kw):
    base = dict(device="auto", fp16=False, bf16=False, fp32=False, packing="auto", attn_implementation="auto",
                compile="auto", cuda_graphs="auto")
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def gpu(monkeypatch):
    """A fake CUDA device of a given compute capability (bf16 from Ampere, 8.0, on)."""
    def make(major, minor=0):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: major >= 8)
        return torch.device("cuda", 0)
    return make


def test_older_gpu_gets_fp16_with_a_scaler_and_no_flash_attention(gpu):
    dev = gpu(7, 0)  # V100
    rt = R.resolve(flags(), dev, world=1, training=True)
    assert (rt.weight_dtype, rt.amp_dtype, rt.use_scaler) == (torch.float16, torch.float16, True)
    assert rt.precision == "fp16 (default on a GPU without bf16)"
    assert rt.attn == "sdpa" and not rt.eval_graphs and not rt.step_graphs and rt.packing and rt.compile
    ev = R.resolve(flags(), dev, world=1, training=False)
    assert ev.amp_dtype == torch.float16 and not ev.use_scaler  # inference needs no scaler
    with pytest.raises(UserError, match="--attn_implementation varlen needs CUDA \\(compute capability >= 8.0\\)"):
        R.resolve(flags(attn_implementation="varlen"), dev)
    with pytest.raises(UserError, match="--cuda_graphs on needs"):
        R.resolve(flags(cuda_graphs="on"), dev)


def test_ampere_and_newer_get_bf16_varlen_and_graphs(gpu):
    dev = gpu(9, 0)  # H100 / H200
    rt = R.resolve(flags(), dev, world=1, training=True)
    assert (rt.weight_dtype, rt.amp_dtype, rt.use_scaler) == (torch.bfloat16, torch.bfloat16, False)
    assert rt.attn == R.VARLEN and rt.eval_graphs and rt.step_graphs
    assert not R.resolve(flags(), dev, world=2, training=True).step_graphs  # DDP: evaluation graphs only
    fp16 = R.resolve(flags(fp16=True), dev, world=1, training=True)
    assert fp16.use_scaler and fp16.step_graphs and fp16.eval_graphs  # the loss scale is read at each replay
    assert R.resolve(flags(packing="off"), dev).attn == "sdpa"


def test_cpu_defaults_and_flag_conflicts():
    rt = R.resolve(flags(), torch.device("cpu"), training=True)
    assert (rt.weight_dtype, rt.amp_dtype, rt.packing, rt.compile, rt.eval_graphs) == (
        torch.float32, None, False, False, False)
    problems = []
    R.check_runtime_args(flags(fp16=True, bf16=True), problems)
    assert problems == ["--fp16, --bf16 and --fp32 exclude each other"]


def test_bf16_flag_on_a_gpu_without_bf16_is_an_error(gpu):
    gpu(7, 5)  # T4
    problems = []
    R.check_runtime_args(flags(bf16=True), problems)
    assert problems == ["--bf16: this GPU has no bf16; use --fp16"]


def test_small_jobs_skip_the_fast_path_unless_forced(gpu):
    dev = gpu(9, 0)
    rt = R.resolve(flags(), dev, training=False)
    small, note = R.for_job(rt, flags(), 250_000, "evaluation")  # 3,000 texts
    # evaluation keeps its graphs: on an H200 they made 3,000 texts 14.6-14.8 s against 17.4-20.0 eager (run 26)
    assert not small.compile and small.eval_graphs and small.attn == R.VARLEN and small.packing
    assert note == ("small evaluation job (250,000 tokens < 1,600,000): compile off, it would cost more start-up "
                    "than it saves (--compile on forces it)")
    # what auto runs is exactly what the flags that say so give: the same runtime, so the same code from here on
    assert small == R.resolve(flags(compile="off", cuda_graphs="on"), dev, training=False)
    no_graphs = R.resolve(flags(cuda_graphs="off"), dev, training=False)
    assert R.for_job(no_graphs, flags(cuda_graphs="off"), 250_000, "evaluation")[0].eval_graphs is False
    train = R.resolve(flags(), dev, training=True)
    assert train.compile and train.step_graphs
    few_steps, note = R.for_job(train, flags(), 600_000, "training")  # ~200 steps of the original recipe
    assert not few_steps.compile and not few_steps.step_graphs and not few_steps.eval_graphs
    assert note.startswith("small training job (600,000 tokens < 750,000): compile and CUDA graphs off")
    assert R.for_job(train, flags(), 800_000, "training") == (train, None)
    big, note = R.for_job(rt, flags(), 10_000_000, "evaluation")
    assert big is rt and note is None
    forced = R.resolve(flags(compile="on", cuda_graphs="on"), dev, training=True)
    kept, note = R.for_job(forced, flags(compile="on", cuda_graphs="on"), 1000, "training")
    assert kept is forced and note is None
    cpu = R.resolve(flags(), torch.device("cpu"))
    assert R.for_job(cpu, flags(), 10, "training") == (cpu, None)


def test_capped_training_rows_turn_cuda_graphs_off_unless_forced(gpu):
    """A card the wanted rows do not fit (the memory plan capped them): CUDA graphs off where --cuda_graphs is auto
    (their private pool ran a 14 GiB cap out of memory, run 15), compile kept; 'on' is obeyed."""
    dev = gpu(9, 0)
    rt = R.resolve(flags(), dev, training=True)
    assert rt.step_graphs and rt.eval_graphs and rt.compile
    off, note = R.for_capped_rows(rt, flags())
    assert not off.step_graphs and not off.eval_graphs and off.compile and off.attn == R.VARLEN
    assert note.startswith("memory: CUDA graphs off on this card") and "--cuda_graphs on forces them" in note
    forced = R.resolve(flags(cuda_graphs="on"), dev, training=True)
    assert R.for_capped_rows(forced, flags(cuda_graphs="on")) == (forced, None)
    plain = R.resolve(flags(cuda_graphs="off"), dev, training=True)
    assert R.for_capped_rows(plain, flags(cuda_graphs="off")) == (plain, None)


def test_compile_workers_start_at_set_up_only_where_the_job_compiles_on_a_gpu(gpu, monkeypatch):
    """Inductor's worker pool is started at set-up when the layers will compile on a GPU (torch would start it only
    at the first compile, and compile kernels one by one until it is up); never for an eager or CPU job."""
    import torch._inductor.async_compile as ac

    started = []
    monkeypatch.setattr(ac, "maybe_warm_pool", lambda: started.append(True))
    dev = gpu(9, 0)
    R.start_compile_workers(R.resolve(flags(), dev, training=True))
    assert started == [True]
    small, _ = R.for_job(R.resolve(flags(), dev, training=True), flags(), 1000, "training")
    R.start_compile_workers(small)
    R.start_compile_workers(R.resolve(flags(compile="off"), dev, training=True))
    R.start_compile_workers(R.resolve(flags(compile="on"), torch.device("cpu"), training=True))
    assert started == [True]


HELP_DRIVER = """import contextlib, io, json, runpy, sys
script = sys.argv[1]
sys.argv = [script, "--help"]
code = 0
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
heavy = ("torch", "transformers", "peft", "tokenizers", "pymongo", "pandas", "numpy", "sklearn", "matplotlib",
         "fastapi", "uvicorn", "torchao")
print(json.dumps({"code": code, "chars": len(out.getvalue()), "heavy": [m for m in heavy if m in sys.modules]}))
"""


@pytest.mark.parametrize("script", ["train_lora.py", "test_saved_lora.py", "predict.py", "serve.py",
                                    "get_data_by_labels.py", "load_model.py"])
def test_help_imports_no_heavy_library(script):
    """Issue 13: `--help` of every script within 1 s. It imports none of torch, transformers, pymongo, pandas...
    (H200 machine, run 34: 0.09-0.12 s each; get_data_by_labels.py imported pymongo first, which that machine lacks)."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    r = subprocess.run([sys.executable, "-c", HELP_DRIVER, script], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["code"] in (0, None) and res["chars"] > 200 and res["heavy"] == [], res


def test_compile_cache_counts_read_inductors_counters_without_importing_dynamo(monkeypatch):
    """train_lora.py's ready line says how many graphs were compiled and how many came from the compile cache
    (whether a user's cache worked). Where nothing compiled, reading them must not import torch._dynamo (~1 s)."""
    import sys
    import types
    from collections import Counter, defaultdict

    monkeypatch.delitem(sys.modules, "torch._dynamo.utils", raising=False)
    assert R.compile_cache_counts() == (0, 0)
    assert "torch._dynamo.utils" not in sys.modules
    counters = defaultdict(Counter)
    counters["inductor"].update(fxgraph_cache_hit=2, fxgraph_cache_miss=1, fxgraph_cache_bypass=1)
    monkeypatch.setitem(sys.modules, "torch._dynamo.utils", types.SimpleNamespace(counters=counters))
    assert R.compile_cache_counts() == (2, 2)
