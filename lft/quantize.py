"""Quantised inference (torchao): which layers, which format, where each mode pays. Inference only.

    p = ArgumentParser(...); add_quantize_arg(p)
    problems = []; check_quantize(args, args.device, problems)        # before anything is loaded
    names = quantize_model(model, args.quantize, runtime)             # after .to(device), before compiling

What is quantised: the frozen base projections inside the decoder layers (q/k/v/o_proj, gate/up/down_proj; for a
layer peft wraps with LoRA, its `base_layer`), and under int8 the token embeddings too. Never the LoRA matrices
(small, and what fine-tuning changed: rounding them would undo part of it) or the `score` head. LoRA stays a separate
float branch beside the quantised base; it is not merged first (merge=True exists for the bench): folding a LoRA
delta of ~1% of a weight into fp8 (3 mantissa bits, steps of ~6%) rounds most of it away.

The modes:
  none  bf16 (GPU) or fp32 (CPU) as before.
  fp8   float8 e4m3 weights and dynamically quantised activations, row-wise scales (one per output channel and
        one per token), fp8 tensor-core matmuls: the speed option on GPUs with fp8 (compute capability >= 8.9:
        Ada, Hopper, Blackwell). Needs bf16 weights. Pays with torch.compile fusing the activation quantisation.
        The first FP8_BF16_LAYERS decoder layers stay bf16: their inputs are the embeddings, small beside what
        the layers add, so fp8's ~3% rounding weighs most there. On an H200 with a trained adapter (bench/RESULTS.md
        run 15) every layer in fp8 agreed with bf16's labels on 98.4% of held-out texts at 1.34x bf16's
        throughput; layers 2-27 only, 99.17% at 1.32x; leaving the last four layers bf16 instead changed nothing
        (98.4%), and no faster accumulation or MLP-only choice got both 99% and 1.3x.
  int8  CPU only: int8 weights and dynamically quantised int8 activations, row-wise scales (int8 matmuls), and
        the token embeddings as int8 rows (Int8Embedding: a fifth of a 1.7B model's weights). The base is loaded as
        its files store it (bf16 for Qwen3's own weights; load_dtype) and each projection is widened to float32
        only while it is quantised, so no float32 copy of the model is ever made; the int8 weights are those a
        float32 load gives (a bf16 value widens exactly), and what stays float (norms, LoRA, head) is float32 as
        without --quantize. A Qwen3-1.7B MLP on a 2-core CPU: slower than fp32 under ~128 tokens per forward,
        where the per-token quantisation costs more than it saves, 1.2-2.6x fp32 at 256-1,024 tokens: serve.py
        warns (serving_note); weight-only was slower than fp32 at every size. On a CPU with native bf16 (AVX512-
        BF16, AMX) --bf16 is faster than int8 at every size, 1.2-12x on that MLP, so int8 is the memory option
        there (0.57x bf16's memory after loading the whole model) and the scripts say so (bf16_note).
        Refused on a GPU (H200, torchao 0.18, bench/RESULTS.md): on a whole 1.7B-shaped model weight-only ran at
        0.3k tokens/s against 153k (run 11) and dynamic activations at 0.87x bf16, 1 / 8 / 64 texts in 4.7 / 6.2 /
        41.2 ms against 4.1 / 5.1 / 35.8 (run 13); on one compiled MLP replayed as a CUDA graph, dynamic
        activations ran 0.74-0.88x bf16 at 64-9,216 tokens per forward, and with inductor's GEMM autotuning
        0.55-0.66x at 64-512 and 1.01-1.12x at 4,096-9,216, each row shape costing 17-31 s to tune; weight-only
        0.01x (runs 29-30). Where int8 was faster, fp8 is faster still (1.32x on the whole model): fp8 is the GPU
        option.
"""
from __future__ import annotations

import functools
import re

from .common import UserError, lazy_import, release_freed_memory

torch = lazy_import("torch")  # loaded on first use: scripts declare --quantize before importing torch

QUANTIZE_CHOICES = ("none", "int8", "fp8")
TORCHAO_VERSION = "0.18.0"  # pinned in requirements-dev.txt; works with torch 2.11 (CUDA) and 2.13 (CPU)
FP8_MIN_CAPABILITY = (8, 9)
# int8 on the CPU is slower than fp32 below about this many tokens per forward (the per-token quantisation costs
# more than the int8 matmul saves): a Qwen3-1.7B-shaped MLP on a 2-core CPU ran 0.25-0.85x fp32 at 8-70 tokens,
# 1.05-1.16x at 128, 1.2-2.6x at 256-1,024 (bench/bench_quant.py --cpu_crossover; bench/RESULTS.md)
INT8_CPU_MIN_TOKENS = 128
EMBEDDING_CHUNK = 8192  # embedding rows widened to float32 at a time while they are quantised
FP8_BF16_LAYERS = 2  # the first decoder layers stay bf16 under fp8 (a quarter of the layers at most: see fp8 above)
# the base projections of a decoder layer, plain (merged folder) or inside a peft LoRA layer (".base_layer")
BASE_LINEAR = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
                         r"(?:\.base_layer)?$")


def add_quantize_arg(p) -> None:
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                   help="quantise the base model's projections for inference (torchao): fp8 for speed on GPUs "
                        "with fp8 (compute capability >= 8.9), int8 on CPU; LoRA and head stay float")


def _gpu(device) -> torch.device | None:
    """The CUDA device a --device flag (or torch.device) will run on, or None for the CPU."""
    kind = device.type if isinstance(device, torch.device) else str(device or "auto")
    if kind == "cpu" or not torch.cuda.is_available():
        return None
    return device if isinstance(device, torch.device) and device.index is not None \
        else torch.device("cuda", torch.cuda.current_device())


def check_quantize(args, device, problems: list[str]) -> None:
    """Append every problem with --quantize to `problems`. `args`: the parsed namespace (reads .quantize and the
    precision flags) or the mode itself."""
    mode = args if isinstance(args, str) else getattr(args, "quantize", "none")
    if mode not in QUANTIZE_CHOICES:
        problems.append(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {mode!r}")
        return
    if mode == "none":
        return
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        problems.append(f"--quantize {mode} needs torchao: pip install torchao=={TORCHAO_VERSION}")
    gpu = _gpu(device)
    if mode == "fp8":
        if gpu is None:
            problems.append("--quantize fp8 needs a CUDA GPU with fp8 (compute capability >= 8.9); "
                            "use --quantize int8 or none here")
        elif torch.cuda.get_device_capability(gpu) < FP8_MIN_CAPABILITY:
            cc = ".".join(map(str, torch.cuda.get_device_capability(gpu)))
            problems.append(f"--quantize fp8: {torch.cuda.get_device_name(gpu)} has compute capability {cc}; "
                            "fp8 matmuls need >= 8.9 (Ada, Hopper or newer); use --quantize int8 or none")
        if not isinstance(args, str) and (getattr(args, "fp16", False) or getattr(args, "fp32", False)):
            problems.append("--quantize fp8 needs bf16 base weights; drop --fp16/--fp32")
    if mode == "int8" and gpu is not None:
        problems.append("--quantize int8 is the CPU option: on a GPU it was slower than bf16 at serving sizes (H200, "
                        "torchao 0.18: dynamic int8 activations 0.55-0.89x bf16 at 64-512 tokens per forward, 0.87x "
                        "on a whole 1.7B-shaped model; weight-only ~0.01x), and where it was faster (1.12x on one "
                        "MLP at 9,216 tokens, after 17-31 s of GEMM autotuning per row shape) fp8 is faster still "
                        "(1.32x on the whole model; bench/RESULTS.md runs 11, 13, 29, 30); use --quantize fp8 "
                        "(compute capability >= 8.9) or none")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo; False where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


BF16_NOTE = ("this CPU has native bf16, where --bf16 ran faster than int8 at every size measured on a Qwen3-1.7B MLP "
             "(1.2-12x at 8-2,048 tokens per forward), and int8 held 0.57x bf16's memory after loading")


def bf16_note(mode: str, device) -> str | None:
    """The note of predict.py and test_saved_lora.py for --quantize int8 on a CPU with native bf16, where --bf16 is
    faster at every size (the whole 1.7B shape on 2 cores, bench/RESULTS.md): int8 is the memory option there."""
    if mode != "int8" or _gpu(device) is not None or not cpu_has_native_bf16():
        return None
    return f"--quantize int8 is a memory option here: {BF16_NOTE}"


def serving_note(mode: str, device) -> str | None:
    """serve.py's warning for --quantize int8 on the CPU: a server's forwards are as small as one request when
    requests come one at a time, and under INT8_CPU_MIN_TOKENS int8 is slower than fp32 there; on a CPU with native
    bf16, --bf16 was faster than int8 at every size measured (bf16_note)."""
    if mode != "int8" or _gpu(device) is not None:
        return None
    note = (f"--quantize int8 on CPU is a memory option for a server: it is slower than fp32 for forwards under "
            f"~{INT8_CPU_MIN_TOKENS} tokens (0.25-0.85x at 8-70 tokens), which a lone short request is, and faster "
            "from there (1.2-2.6x at 256-1,024 tokens; requests arriving together are batched)")
    return note + f"; {BF16_NOTE}" if cpu_has_native_bf16() else note


def import_torchao():
    """torchao.quantization (its log noise on CPU builds of torch is quieted in lft/__init__.py); a missing
    torchao is a one-line error."""
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise UserError(f"--quantize needs torchao ({e}): pip install torchao=={TORCHAO_VERSION}") from None
    return tq


def config_for(mode: str, granularity: str = "row"):
    """The torchao config of a mode (see the module docstring; int8 is CPU-only). `granularity` of fp8 scales:
    'row' (one per output channel and per token) or 'tensor' (one per matrix): the bench compares both.
    set_inductor_config=False: torchao's otherwise switches on process-wide inductor autotuning, which costs
    compile time for every later compile in the process."""
    tq = import_torchao()
    gran = tq.PerRow() if granularity == "row" else tq.PerTensor()
    if mode == "fp8":
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=gran, set_inductor_config=False)
    if mode == "int8":  # CPU (check_quantize refuses it on a GPU; the bench measures GPU int8 by raw configs)
        return tq.Int8DynamicActivationInt8WeightConfig(granularity=gran, set_inductor_config=False)
    raise ValueError(f"no torchao config for --quantize {mode!r}")


def is_base_linear(module: "torch.nn.Module", fqn: str) -> bool:
    """torchao's filter: a plain nn.Linear that is a decoder layer's base projection (never lora_A/lora_B,
    which live under '<proj>.lora_A.default', nor the head or the embeddings)."""
    return type(module) is torch.nn.Linear and BASE_LINEAR.search(fqn) is not None


def first_quantised_layer(mode: str, n_layers: int) -> int:
    """The index of the first decoder layer a mode quantises (fp8 leaves the first FP8_BF16_LAYERS in bf16, never
    more than a quarter of a model's layers; int8 quantises all)."""
    return min(FP8_BF16_LAYERS, n_layers // 4) if mode == "fp8" else 0


def layer_of(fqn: str) -> int:
    return int(re.search(r"(?:^|\.)layers\.(\d+)\.", fqn).group(1))


def quantize_with(model: "torch.nn.Module", config, keep=lambda fqn: True, widen=None, release=None) -> list[str]:
    """Apply a torchao config to the base projections whose names `keep` accepts; the names quantised, in model
    order. `widen`: a dtype each projection's weight is cast to just before it is quantised (one at a time, so
    the model is never held in that dtype whole). `release`: called after each decoder layer's projections."""
    tq = import_torchao()
    picked = [(fqn, m) for fqn, m in model.named_modules() if is_base_linear(m, fqn) and keep(fqn)]
    for i, (fqn, module) in enumerate(picked):
        if widen is not None:
            module.weight.data = module.weight.data.to(widen)
        tq.quantize_(module, config)  # in place: the Linear's weight becomes a torchao tensor
        if release is not None and (i + 1 == len(picked) or layer_of(picked[i + 1][0]) != layer_of(fqn)):
            release()
    return [fqn for fqn, _ in picked]


@functools.cache
def int8_embedding_class() -> type:
    """The Int8Embedding module class, defined on first use (this module does not import torch until needed: the
    scripts declare --quantize before torch loads)."""

    class Int8Embedding(torch.nn.Module):
        """An nn.Embedding held as int8 rows with one float scale per row (symmetric; torchao's affine
        quantisation primitives choose and apply the scales). A lookup gathers the int8 rows it needs and only
        then dequantises them: torchao 0.18's own quantised embedding tensors dequantise the whole table at every
        lookup (151,936 x 2,048 values for Qwen3), which costs time and a table-sized transient."""

        def __init__(self, emb: "torch.nn.Embedding", dtype: "torch.dtype"):
            super().__init__()
            tq = import_torchao()
            w = emb.weight.detach()
            rows, dim = w.shape
            q = torch.empty(rows, dim, dtype=torch.int8, device=w.device)
            scale = torch.empty(rows, 1, dtype=dtype, device=w.device)
            for i in range(0, rows, EMBEDDING_CHUNK):  # widened a chunk at a time: no table-sized float copy
                part = w[i:i + EMBEDDING_CHUNK].to(dtype)
                s, zero = tq.choose_qparams_affine(part, tq.MappingType.SYMMETRIC, (1, dim), torch.int8,
                                                   scale_dtype=dtype)
                q[i:i + EMBEDDING_CHUNK] = tq.quantize_affine(part, (1, dim), s, zero, torch.int8)
                scale[i:i + EMBEDDING_CHUNK] = s.reshape(-1, 1)
                if zero.any():  # symmetric int8 keeps 0 at 0; the lookup below relies on it
                    raise RuntimeError("int8 embeddings: torchao returned a nonzero zero point for symmetric "
                                       "quantisation")
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
            self.num_embeddings, self.embedding_dim, self.padding_idx = rows, dim, emb.padding_idx

        def forward(self, input_ids):
            F = torch.nn.functional
            return F.embedding(input_ids, self.qweight).to(self.scale.dtype) * F.embedding(input_ids, self.scale)

        def extra_repr(self) -> str:
            return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"

    return Int8Embedding


def load_dtype(mode: str, runtime):
    """The dtype a base model is loaded in before quantize_model: the runtime's, except int8 on the CPU, which
    loads the checkpoint as its files store it ("auto": bf16 for Qwen3's own weights) and widens piece by piece
    while quantising, so a float32 copy of the whole model never exists (a float32 base stays float32)."""
    if mode == "int8" and runtime.device.type == "cpu" and runtime.weight_dtype == torch.float32:
        return "auto"
    return runtime.weight_dtype


def quantize_model(model: "torch.nn.Module", mode: str, runtime, *, merge: bool = False,
                   granularity: str = "row") -> list[str]:
    """Quantise `model` (a qwen3_classification_direct.Qwen3Classifier already on its device, loaded in
    load_dtype(mode, runtime)) in place for inference; return the names of the layers quantised ([] for 'none').
    Afterwards every float tensor left in the base is in runtime.weight_dtype. `merge`: fold LoRA into the base
    weights first (peft merge_and_unload; then the merged weights are quantised, LoRA included)."""
    if mode == "none":
        return []
    if mode not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {mode!r}")
    if mode == "fp8" and runtime.weight_dtype != torch.bfloat16:
        raise UserError(f"--quantize fp8 needs bf16 base weights, not {str(runtime.weight_dtype).split('.')[-1]}; "
                        "drop --fp16/--fp32")
    problems: list[str] = []
    check_quantize(mode, runtime.device, problems)
    if problems:
        raise UserError("; ".join(problems))
    if merge and hasattr(model.backbone, "merge_and_unload"):
        model.backbone = model.backbone.merge_and_unload()
    base = model.base_model if hasattr(model, "base_model") else model  # the plain Qwen3Model (after any merge)
    first = first_quantised_layer(mode, len(base.layers) if hasattr(base, "layers") else 0)
    dtype, cpu = runtime.weight_dtype, runtime.device.type == "cpu"
    # on the CPU the replaced weights' memory goes back to the system layer by layer (release_freed_memory)
    names = quantize_with(model, config_for(mode, granularity), keep=lambda fqn: layer_of(fqn) >= first,
                          widen=dtype, release=release_freed_memory if cpu else None)
    if not names:
        raise UserError(f"--quantize {mode}: the model has no decoder projections to quantise")
    if mode == "int8" and hasattr(base, "embed_tokens"):
        base.embed_tokens = int8_embedding_class()(base.embed_tokens, dtype)
        names.append(next(n for n, m in model.named_modules() if m is base.embed_tokens))
    if cpu:  # what the base keeps float (norms), in the runtime's dtype and in memory of its own
        for name, t in [*base.named_parameters(), *base.named_buffers()]:
            if "lora_" not in name and type(t.data) is torch.Tensor and t.is_floating_point():
                # loaded narrower (load_dtype), it widens; loaded at the runtime's dtype, it may still be a view of
                # the memory-mapped checkpoint, which then stays mapped whole (--bf16 --quantize int8 held 5.33
                # GiB after loading the 1.7B shape, not ~2.1): a copy lets the mapping go
                t.data = t.data.to(dtype) if t.dtype != dtype else t.data.clone()
        release_freed_memory()
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()  # the bf16 weights just replaced: give their memory back (what nvidia-smi shows)
    return names


def describe(mode: str) -> str:
    """One phrase for the model line of a script."""
    if mode == "none":
        return "not quantised"
    what = {"fp8": f"fp8 weights + dynamic fp8 activations, row-wise scales; the first {FP8_BF16_LAYERS} decoder "
                   "layers of a model of 8 or more stay bf16",
            "int8": "int8 weights + dynamic int8 activations, int8 token embeddings"}[mode]
    where = "base projections and embeddings" if mode == "int8" else "base projections only"
    return f"quantised {mode} ({what}; {where}, LoRA and head float)"
