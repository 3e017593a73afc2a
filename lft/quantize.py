"""Quantised inference (torchao): which layers, which format, where each mode pays. Inference only.

    p = ArgumentParser(...); add_quantize_arg(p)
    problems = []; check_quantize(args, args.device, problems)        # before anything is loaded
    names = quantize_model(model, args.quantize, runtime)             # after .to(device), before compiling

What is quantised: the frozen base projections inside the decoder layers (q/k/v/o_proj, gate/up/down_proj; for a
layer a LoRA layer wraps, its `base_layer`), and under int8 the token embeddings too. Never the LoRA matrices
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
        the token embeddings as int8 rows (Int8Embedding: a fifth of a 1.7B model's weights). The projections run
        as Int8Linear: torchao's numbers bit for bit, without the sum of the whole weight that torchao 0.18 takes
        again at every call on a VNNI CPU without AMX (17-22 ms for a 2,048 x 6,144 projection on 2 cores, against
        1 ms for the int8 matmul of an 8-token forward). A forward takes at most INT8_CPU_ROW_TOKENS tokens
        (forward_tokens), and the memory it freed goes back to the system after it. The base is loaded as its
        files store it (bf16 for Qwen3's own weights; load_dtype) and each projection is widened to float32 only
        while it is quantised, so no float32 copy of the model is ever made; the int8 weights are those a float32
        load gives (a bf16 value widens exactly), and what stays float (norms, LoRA, head) is float32 as without
        --quantize. The whole Qwen3-1.7B shape on 2 cores of an AVX512-BF16 EPYC (bench/RESULTS.md, session 10):
        2.13 GiB after loading (0.57x --bf16's), a peak while classifying of 0.56-0.59x bf16's, and 1.02-1.45x
        --bf16's speed (three runs), 3-4x fp32's, from one 70-token text to 2,048 tokens; in a memory cgroup of
        0.6x bf16's peak it loads and classifies at full speed. With oneDNN capped at AVX512-VNNI (a CPU without
        native bf16), its MLP ran 1.3-8x bf16 and 2-4x fp32 at every size. On an AMX Xeon --bf16 was faster (int8
        0.36-0.85x on the MLP): the scripts say so there (int8_note).
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
# int8 on the CPU runs forwards of at most this many tokens (or one text of max_length, if longer; forward_tokens):
# its peak memory grows with the forward, and its cost per token too past a few hundred tokens. Whole Qwen3-1.7B
# shape, 2 cores (bench/RESULTS.md, session 10): a forward of 2,048 tokens peaked at 0.73x bf16's memory and cost
# 9.6 ms a token (bf16, uncapped: 8.9-9.4); capped at 512 tokens, 0.592-0.607x and 6.3-8.3 ms; at 256, 0.586-0.587x
# in four runs and 7.2-8.2 ms
INT8_CPU_ROW_TOKENS = 256
EMBEDDING_CHUNK = 8192  # embedding rows widened to float32 at a time while they are quantised
FP8_BF16_LAYERS = 2  # the first decoder layers stay bf16 under fp8 (a quarter of the layers at most: see fp8 above)
# the base projections of a decoder layer, plain (merged folder) or inside a LoRA layer (".base_layer")
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


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 matmuls (Intel Xeon from Sapphire Rapids on)."""
    return "amx_bf16" in cpu_flags()


AMX_NOTE = ("this CPU has AMX, where --bf16 ran faster than int8 on a Qwen3-1.7B MLP (an AMX Xeon, 16 threads: int8 "
            "0.36-0.85x bf16's speed at 1-2,048 tokens per forward); int8 holds ~0.57x bf16's memory")


def int8_note(mode: str, device) -> str | None:
    """The `note:` of predict.py, test_saved_lora.py and serve.py for --quantize int8 on a CPU with AMX, where --bf16
    is faster (bench/RESULTS.md, session 10): int8 is the memory option there. Elsewhere int8 was the faster option
    as well: on 2 cores of an AVX512-BF16 EPYC, 1.02-1.45x --bf16 and 3-4x fp32 on the whole 1.7B shape; with oneDNN
    capped at AVX512-VNNI (no native bf16), 1.3-8x bf16 and 2-4x fp32 on its MLP."""
    if not on_cpu_int8(mode, device) or not cpu_has_amx():
        return None
    return f"--quantize int8 is a memory option here: {AMX_NOTE}"


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


def quantize_with(model: "torch.nn.Module", config, keep=lambda fqn: True, widen=None, release=None,
                  swap=None) -> list[str]:
    """Apply a torchao config to the base projections whose names `keep` accepts; the names quantised, in model
    order. `widen`: a dtype each projection's weight is cast to just before it is quantised (one at a time, so
    the model is never held in that dtype whole). `release`: called after each decoder layer's projections.
    `swap`: a module class that replaces each quantised Linear, built from it (Int8Linear)."""
    tq = import_torchao()
    picked = [(fqn, m) for fqn, m in model.named_modules() if is_base_linear(m, fqn) and keep(fqn)]
    for i, (fqn, module) in enumerate(picked):
        if widen is not None:
            module.weight.data = module.weight.data.to(widen)
        tq.quantize_(module, config)  # in place: the Linear's weight becomes a torchao tensor
        if swap is not None:
            parent, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(parent), name, swap(module))
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


@functools.cache
def int8_linear_class() -> type:
    """The Int8Linear module class, defined on first use (see int8_embedding_class)."""
    tq = import_torchao()
    from torchao.utils import _cpu_is_amx_tile_supported, _cpu_is_vnni_supported, torch_version_at_least

    class Int8Linear(torch.nn.Module):
        """A base projection quantised by torchao's int8 config (config_for("int8")), run on the CPU with the
        numbers torchao's own linear gives, bit for bit (a test checks it), without its fixed cost per call.

        On a CPU with AVX512-VNNI and no AMX, torchao 0.18 shifts the int8 activations to uint8 for VNNI's u8 x s8
        instruction and subtracts 128 x the weight's column sums to undo the shift; it sums the whole weight again
        at every call (torchao.kernel.intmm._int_scaled_matmul_cpu). That sum took 17-22 ms per 2,048 x 6,144
        projection on 2 cores, against 1 ms for the int8 matmul of an 8-token forward, so a Qwen3-1.7B MLP of one
        short text ran 12x slower than bf16. Here the sums are taken once, when the weight is quantised. Elsewhere
        (AMX, or no VNNI) torchao multiplies int8 x int8 directly and so does this module."""

        def __init__(self, linear: "torch.nn.Linear"):
            super().__init__()
            w = linear.weight
            kw = getattr(w, "act_quant_kwargs", None)
            if not isinstance(w, tq.Int8Tensor) or kw is None or w.act_pre_scale is not None \
                    or kw.mapping_type != tq.MappingType.SYMMETRIC or w.block_size[-1] != w.qdata.shape[-1]:
                raise TypeError("Int8Linear takes a Linear quantised by config_for('int8') (row-wise int8 weights, "
                                "symmetric dynamic int8 activations)")
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.act_quant = kw
            self.register_buffer("qweight", w.qdata.contiguous())  # (out, in) int8
            self.register_buffer("weight_scale", w.scale.detach().flatten().clone())  # (out,)
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
            # torchao's choice of kernel (both give the same integers)
            self.uint8 = (not _cpu_is_amx_tile_supported() and _cpu_is_vnni_supported()
                          and torch_version_at_least("2.12.0.dev"))
            # torchao's correction term, 128 x each output channel's weight sum, taken once
            self.register_buffer("compensation", self.qweight.t().sum(dim=0, keepdim=True, dtype=torch.int32) * 128
                                 if self.uint8 else None)

        def forward(self, x):
            # the steps of torchao's int8 linear (Int8Tensor's aten.linear), in its order and dtypes
            xq = tq.Int8Tensor.from_hp(x, self.act_quant.granularity, mapping_type=self.act_quant.mapping_type,
                                       reduce_range=self.act_quant.reduce_range)
            a = xq.qdata.reshape(-1, xq.qdata.shape[-1])
            s = xq.scale.reshape(-1, 1)
            s = s.float() if s.dtype == torch.half else s
            w = self.qweight.t()
            if self.uint8:  # a + 128 as uint8 (torchao: through int32) is a's bits with the top one flipped
                c = torch._int_mm(a.view(torch.uint8) ^ 0x80, w)
                c.sub_(self.compensation)
            else:
                c = torch._int_mm(a, w)
            y = (c.to(s.dtype) * s).to(x.dtype)
            y = (y * self.weight_scale).reshape(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                y += self.bias
            return y.to(x.dtype)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and activations"

    return Int8Linear


def on_cpu_int8(mode: str, device) -> bool:
    """Whether `mode` is int8 on the CPU (`device`: a --device flag or a torch.device), where the CPU-only int8 rules
    apply (load_dtype, forward_tokens, int8_note, Predictor's memory release)."""
    return mode == "int8" and _gpu(device) is None


def forward_tokens(mode: str, device, wanted: int, max_length: int) -> int:
    """Tokens per forward (a padded batch or packed row) for a job that asks for `wanted`: int8 on the CPU takes at
    most INT8_CPU_ROW_TOKENS (max_length where that is longer), every other mode `wanted`."""
    return min(wanted, max(INT8_CPU_ROW_TOKENS, max_length)) if on_cpu_int8(mode, device) else wanted


def load_dtype(mode: str, runtime):
    """The dtype a base model is loaded in before quantize_model: the runtime's, except int8 on the CPU, which
    loads the checkpoint as its files store it ("auto": bf16 for Qwen3's own weights) and widens piece by piece
    while quantising, so a float32 copy of the whole model never exists (a float32 base stays float32)."""
    if on_cpu_int8(mode, runtime.device) and runtime.weight_dtype == torch.float32:
        return "auto"
    return runtime.weight_dtype


def quantize_model(model: "torch.nn.Module", mode: str, runtime, *, merge: bool = False,
                   granularity: str = "row") -> list[str]:
    """Quantise `model` (a qwen3_classification_direct.Qwen3Classifier already on its device, loaded in
    load_dtype(mode, runtime)) in place for inference; return the names of the layers quantised ([] for 'none').
    Afterwards every float tensor left in the base is in runtime.weight_dtype. `merge`: fold LoRA into the base
    weights first (qcd.merge_lora; then the merged weights are quantised, LoRA included)."""
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
    if merge and hasattr(model, "backbone"):
        import qwen3_classification_direct as qcd

        qcd.merge_lora(model.backbone)
    base = model.base_model if hasattr(model, "base_model") else model  # the decoder
    first = first_quantised_layer(mode, len(base.layers) if hasattr(base, "layers") else 0)
    dtype, cpu = runtime.weight_dtype, runtime.device.type == "cpu"
    # on the CPU the replaced weights' memory goes back to the system layer by layer (release_freed_memory)
    names = quantize_with(model, config_for(mode, granularity), keep=lambda fqn: layer_of(fqn) >= first,
                          widen=dtype, release=release_freed_memory if cpu else None,
                          swap=int8_linear_class() if mode == "int8" else None)
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
