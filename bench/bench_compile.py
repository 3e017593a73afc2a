"""Where torch.compile's start-up time goes (issue 13, goal 4): the decoder layers of a Qwen3-1.7B-shaped model
(random bf16 weights, 2 layers: every layer shares one compiled graph), LoRA as train_lora.py's defaults, packed
varlen rows, compiled as train_lora.py compiles them, under variants of what the compiled graph holds:

  base             as train_lora.py does it today
  attn_eager       the varlen attention call left out of the graph (torch.compiler.disable: a graph break)
  no_dropout       LoRA dropout 0 (no random numbers in the graph)
  fallback_random  torch._inductor.config.fallback_random (dropout masks drawn by eager torch)
  static           compiled with dynamic=False (one graph per row width: is symbolic shape reasoning the cost?)
  no_lora          the frozen layers without LoRA, input made to require grad (the LoRA modules' share)

--cprofile runs the first variant alone, cold then warm, under cProfile and prints where the first training
forward + backward spends its time (cumulative and own time), and how many kernels inductor generated.

Each variant runs in its own process with its own inductor cache, first cold, then warm (a second process on
the same cache), all variants side by side. Each process times: the first forward + backward of a 4,608-token
row (training's compile), a second width (3,072: a recompile?), the first no-grad forward of a 9,216-token row
(evaluation's compile), and inductor's own timers (torch._dynamo.utils.compile_times).

    python bench/bench_compile.py [--variants base,attn_eager,...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("base", "attn_eager", "no_dropout", "fallback_random", "static", "no_lora")
TIMERS = ("fw_compiler_base", "bw_compiler", "Scheduler.codegen", "compile_file", "PyCodeCache.load_by_key_path",
          "AOTAutogradCache.inductor_load", "async_compile.wait")


def child(variant: str) -> dict:
    sys.path.insert(0, str(REPO))
    import torch
    import qwen3_classification_direct as qcd
    from lft import data as D
    from lft.runtime import VARLEN

    if variant == "attn_eager":
        qcd.varlen_attention = torch.compiler.disable(qcd.varlen_attention)
    if variant == "fallback_random":
        torch._inductor.config.fallback_random = True
    if variant == "static":
        qcd.compile_decoder_layers = _static_compile(qcd.compile_decoder_layers)
    cfg = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=2, num_attention_heads=16,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
               rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, model_type="qwen3")
    torch.manual_seed(0)
    backbone = qcd.new_backbone(cfg, torch.bfloat16, VARLEN, "cuda")
    model = qcd.Qwen3Classifier(backbone, 6, 0.1, "last").cuda()
    if variant == "no_lora":
        backbone.requires_grad_(False)
    else:
        model = qcd.add_lora(model, r=8, alpha=16, dropout=0.0 if variant == "no_dropout" else 0.1)
    model.train()
    qcd.compile_decoder_layers(model)
    out = {"variant": variant}

    def row(n_texts: int, length: int = 256):
        return D.to_device(D.collate_packed([[100 + k] * length for k in range(n_texts)]), "cuda")

    def timed(name, fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out[name] = round(time.perf_counter() - t, 2)

    def train_step(enc):
        with torch.autocast("cuda", torch.bfloat16):
            model(**enc).float().sum().backward()
    prof_path = os.environ.get("LFT_CPROFILE")
    if prof_path:
        import cProfile

        prof = cProfile.Profile()
        timed("train_first_s", lambda: prof.runcall(train_step, row(18)))
        prof.dump_stats(prof_path)
    else:
        timed("train_first_s", lambda: train_step(row(18)))
    timed("train_again_s", lambda: train_step(row(18)))
    timed("train_other_width_s", lambda: train_step(row(12)))
    model.eval()

    def infer():
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            model(**row(36))
    timed("eval_first_s", infer)
    timed("eval_again_s", infer)
    from torch._dynamo.utils import compile_times

    table = compile_times(repr="csv", aggregate=True)
    names, values = table if isinstance(table, tuple) else ([], [])
    agg = dict(zip(names, values))
    for k in TIMERS:
        hits = [v for n, v in agg.items() if n.endswith(k)]
        out[k] = round(float(sum(float(x) for x in hits)), 2) if hits else None
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/nonexistent"))
    sources = [f for f in cache.rglob("*.py") if "triton" not in f.parts[-2:-1]]
    out["inductor_modules"] = len(sources)
    out["triton_kernel_defs"] = sum(f.read_text(errors="replace").count("def triton_") for f in sources)
    out["cubins"] = len(list(cache.rglob("*.cubin")))
    return out


def _static_compile(original):
    def compile_static(model):
        original(model)
        for layer in model.base_model.layers:
            layer.compile(dynamic=False)
    return compile_static


def print_profile(path: Path, top: int = 45) -> None:
    """The profile's heaviest functions by cumulative and by own time, paths shortened to the package."""
    import io
    import pstats

    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        st = pstats.Stats(str(path), stream=buf)
        st.sort_stats(key).print_stats(top)
        text = buf.getvalue()
        for marker in ("site-packages/", "lib/python3.12/"):
            text = text.replace(marker, "")
        print(f"\n--- {path.name} by {key}\n" + "\n".join(line[:220] for line in text.splitlines()
                                                           if line.strip() and ".prof" not in line))


def run_all(variants, cache_root: Path, label: str, profile_dir: Path | None = None) -> list[dict]:
    procs = []
    for v in variants:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_root / v),
                   TRITON_CACHE_DIR=str(cache_root / v / "triton"))
        if profile_dir is None:  # side by side: share the CPU
            env["TORCHINDUCTOR_COMPILE_THREADS"] = "4"
        else:
            env["LFT_CPROFILE"] = str(profile_dir / f"compile_{v}_{label}.prof")
        procs.append((v, subprocess.Popen([sys.executable, __file__, "--child", v], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=env)))
    rows = []
    for v, p in procs:
        stdout, stderr = p.communicate()
        line = next((x for x in stdout.splitlines() if x.startswith("{")), None)
        row = json.loads(line) if line else {"variant": v, "error": stderr.strip().splitlines()[-1:]}
        row["cache"] = label
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--cprofile", action="store_true", help="the first variant alone, cold then warm, under cProfile")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)), flush=True)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    root = Path(tempfile.mkdtemp(prefix="lft_compile_"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cprofile:
        rows = []
        for label in ("cold", "warm"):
            rows += run_all(variants[:1], root, label, profile_dir=out)
            print_profile(out / f"compile_{variants[0]}_{label}.prof")
        variants = variants[1:]
    else:
        rows = []
    if variants:
        rows += run_all(variants, root, "cold") + run_all(variants, root, "warm")
    cols = ["train_first_s", "train_again_s", "train_other_width_s", "eval_first_s", "eval_again_s", *TIMERS,
            "inductor_modules", "triton_kernel_defs", "cubins"]
    print("\n| variant | cache | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 2))
    for r in rows:
        print(f"| {r['variant']} | {r['cache']} | " + " | ".join(str(r.get(c, r.get('error'))) for c in cols) + " |")
    (out / "bench_compile.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
