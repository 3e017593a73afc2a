"""Runtime decisions: device, dtypes, packing, attention kernel, compile, CUDA graphs. Resolved once per process.

Every script declares the same flags through `add_runtime_args(parser)` and turns them into one frozen
`Runtime` with `resolve(args, device, world)`; nothing else in the toolkit looks at these flags again.

    p = ArgumentParser(...); add_runtime_args(p)
    args = p.parse_args(argv); problems = []; check_runtime_args(args, problems)
    rt = resolve(args, torch.device("cuda", 0), world=1)   # rt.weight_dtype, rt.amp_dtype, rt.eval_graphs, ...

The policy, in one place:
  precision  --fp16 / --bf16 / --fp32 as asked; otherwise bf16 on a GPU that has it (Qwen3 was trained in
             bf16), fp16 + GradScaler on a GPU without bf16, fp32 on CPU.
  packing    auto: on for CUDA (texts back to back in rows, no padding); off pads each batch.
  attention  auto: flash attention over packed rows (torch.nn.attention.varlen) on CUDA with packing, else sdpa.
  compile    auto: torch.compile the decoder layers on CUDA.
  graphs     auto: CUDA graphs of evaluation rows wherever CUDA + packing + varlen apply; of training steps
             too in single-process runs without a GradScaler (DDP's hooks and the scaler live outside a graph).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from .common import UserError

VARLEN = "lft_varlen"  # the attention implementation name qwen3_classification_direct registers


@dataclass(frozen=True)
class Runtime:
    # (typed as Any: a dataclass resolves string annotations naming a module, which would import torch early)
    device: Any  # torch.device
    weight_dtype: Any  # torch.dtype of the frozen base model's weights
    amp_dtype: Any  # torch.dtype of every forward's autocast (None: no autocast)
    use_scaler: bool  # fp16: a GradScaler guards the backward
    precision: str  # what was chosen and why, for the banner
    packing: bool
    attn: str  # VARLEN, "sdpa" or "eager"
    compile: bool
    eval_graphs: bool  # CUDA graphs of evaluation/prediction rows
    step_graphs: bool  # CUDA graphs of training micro-steps

    @property
    def graphs_text(self) -> str:
        return "training steps and evaluation" if self.step_graphs else "evaluation" if self.eval_graphs else "off"


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The flags every script shares (the original's --fp16 plus --bf16/--fp32, and the GPU fast path)."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if visible")
    g.add_argument("--fp16", action="store_true", help="fp16 autocast (+ GradScaler when training; fp32 LoRA/head)")
    g.add_argument("--bf16", action="store_true", help="bf16 base weights and autocast (default on a GPU with bf16)")
    g.add_argument("--fp32", action="store_true", help="full fp32 even on a GPU")
    g.add_argument("--packing", choices=("auto", "on", "off"), default="auto",
                   help="pack texts back to back into rows without padding (auto: on for CUDA)")
    g.add_argument("--attn_implementation", default="auto", choices=("auto", "sdpa", "eager", "varlen"),
                   help="attention kernel (auto: varlen flash attention for packed rows on CUDA, else sdpa)")
    g.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the decoder layers (auto: on for CUDA)")
    g.add_argument("--cuda_graphs", choices=("auto", "on", "off"), default="auto",
                   help="replay fixed-shape packed rows as CUDA graphs (auto: on with CUDA + packing; training "
                        "steps only in single-process runs)")


def check_runtime_args(args, problems: list[str]) -> None:
    """Append every problem with the runtime flags (the script raises them all at once)."""
    import torch  # here, not at the top: scripts import this module before torch (fast --help)

    if sum([args.fp16, args.bf16, args.fp32]) > 1:
        problems.append("--fp16, --bf16 and --fp32 exclude each other")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device visible")
    if args.bf16 and args.device != "cpu" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        problems.append("--bf16: this GPU has no bf16; use --fp16")


def on_for_cuda(flag: str, device) -> bool:
    """An auto|on|off flag: 'auto' means on for CUDA."""
    import torch

    return flag == "on" or (flag == "auto" and torch.device(device).type == "cuda")


def choose_precision(args, device: torch.device, training: bool = True):
    """(weight dtype, autocast dtype or None, use GradScaler, reason)."""
    import torch

    if args.fp16:
        return torch.float16, torch.float16, training, "fp16 (--fp16): autocast" + (
            " + GradScaler, fp32 LoRA/head" if training else "")
    if args.bf16:
        return torch.bfloat16, torch.bfloat16, False, "bf16 (--bf16): bf16 base, fp32 LoRA/head"
    if device.type == "cuda" and not args.fp32:
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, torch.bfloat16, False, "bf16 (default on a GPU; Qwen3 was trained in bf16)"
        return torch.float16, torch.float16, training, "fp16 (default on a GPU without bf16)"
    why = "--fp32" if args.fp32 else "default on CPU"
    return torch.float32, None, False, f"fp32 ({why})"


def have_varlen(device) -> bool:
    import torch

    if torch.device(device).type != "cuda":  # the import costs ~2 s (it loads dynamo): only where it can run
        return False
    if torch.cuda.get_device_capability(device)[0] < 8:  # flash attention needs Ampere or newer
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_attention(requested: str, packing: bool, device) -> str:
    """'auto': varlen flash attention for packed rows on CUDA; sdpa otherwise (on CPU, packed rows get a
    block-diagonal mask that transformers derives from the restarting position ids)."""
    if requested == "varlen":
        if not (packing and have_varlen(device)):
            raise UserError("--attn_implementation varlen needs CUDA (compute capability >= 8.0), torch >= 2.10 "
                            "and --packing on")
        return VARLEN
    if requested == "auto":
        return VARLEN if packing and have_varlen(device) else "sdpa"
    return requested


def resolve(args, device: torch.device, world: int = 1, training: bool = False) -> Runtime:
    """The one place the runtime flags become decisions (see the module docstring)."""
    weight, amp, scaler, why = choose_precision(args, device, training)
    packing = on_for_cuda(args.packing, device)
    attn = choose_attention(args.attn_implementation, packing, device)
    possible = device.type == "cuda" and packing and attn == VARLEN
    if args.cuda_graphs == "on" and not possible:
        raise UserError("--cuda_graphs on needs a CUDA device, --packing on and varlen attention")
    graphs = possible and args.cuda_graphs != "off"
    return Runtime(device=device, weight_dtype=weight, amp_dtype=amp, use_scaler=scaler, precision=why,
                   packing=packing, attn=attn, compile=on_for_cuda(args.compile, device), eval_graphs=graphs,
                   step_graphs=graphs and training and world == 1)


# Small jobs: compiling costs a fixed start-up and pays per token. Measured on an H200 with the Qwen3-1.7B shape
# (bench/RESULTS.md, issue 13): evaluation runs ~95k real tokens/s with CUDA graphs and no compile, ~170k compiled,
# and compiling costs ~7.5 s with a cold compile cache (runs 4, 19-20): even at ~1.6M real tokens. Below that a job
# keeps its evaluation graphs (capturing a few row shapes costs little, and they spare the Python launch cost of
# eager layers: 3,000 texts in 14.6-14.8 s wall against 17.4-20.0 s eager, run 26). Training runs ~20k tokens/s
# without the fast path and ~62k with it, and compiling cold costs ~20 s (the training graph; 4.9 s warm) plus the
# evaluation graph and the captures, ~25 s in all: even at ~750k tokens (~250 optimizer steps of the original
# recipe); a small training job turns compile and graphs off. Before run 19 the training graph took 104 s cold to
# compile (float attributes as graph inputs, qwen3_classification_direct.compile_decoder_layers) and these were
# 2.5M and 3M. A cold cache is assumed, so auto is never slower than --compile off --cuda_graphs off.
SMALL_JOB_TOKENS = {"evaluation": 1_600_000, "training": 750_000}


def for_job(rt: Runtime, args, tokens: int, kind: str) -> tuple[Runtime, str | None]:
    """`rt` without the parts of the fast path a job is too small to pay for (only where their flags are 'auto';
    'on' is obeyed), and the line that says so; `tokens`: the real tokens the job will process. An evaluation
    turns compile off and keeps its CUDA graphs; a training run turns both off."""
    import dataclasses

    if rt.device.type != "cuda" or tokens >= SMALL_JOB_TOKENS[kind]:
        return rt, None
    off = {}
    if rt.compile and args.compile == "auto":
        off["compile"] = False
    if kind == "training" and (rt.eval_graphs or rt.step_graphs) and args.cuda_graphs == "auto":
        off.update(eval_graphs=False, step_graphs=False)
    if not off:
        return rt, None
    if len(off) == 1:
        what, force = "compile off, it would cost more start-up than it saves", "--compile on forces it"
    else:
        what, force = ("compile and CUDA graphs off, they would cost more start-up than they save",
                       "--compile on / --cuda_graphs on force them")
    return dataclasses.replace(rt, **off), (
        f"small {kind} job ({tokens:,} tokens < {SMALL_JOB_TOKENS[kind]:,}): {what} ({force})")


def start_compile_workers(rt: Runtime) -> None:
    """Start inductor's compile worker processes now, where the job will compile on a GPU, so they are up when the
    first layer compiles. torch starts them only at the first compile, and until they answer it compiles every
    Triton kernel one at a time in this process (torch._inductor.async_compile: a kernel goes to the pool only
    once the pool is ready). Started at set-up, they come up beside the data and model loading. Honours
    TORCH_WARM_POOL=0 and TORCHINDUCTOR_COMPILE_THREADS=1 as torch does."""
    if not rt.compile or rt.device.type != "cuda":
        return
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:  # a torch without it starts the pool at the first compile, as before
        return
    maybe_warm_pool()


def compile_cache_counts() -> tuple[int, int]:
    """(graphs inductor loaded from its cache, graphs it compiled) so far in this process: whether a run's compile
    cache worked (train_lora.py's ready line). (0, 0) where nothing has compiled (dynamo not even imported: importing
    it here would cost a start ~1 s) or this torch keeps no such counters."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")
    c = getattr(utils, "counters", {}).get("inductor", {})
    return int(c.get("fxgraph_cache_hit", 0)), int(c.get("fxgraph_cache_miss", 0) + c.get("fxgraph_cache_bypass", 0))


def for_capped_rows(rt: Runtime, args) -> tuple[Runtime, str | None]:
    """`rt` without CUDA graphs when the memory plan has capped the training rows (a card the wanted rows do not
    fit), where --cuda_graphs is 'auto' ('on' is obeyed: train_lora then sizes the graphs' pool for the widest
    row), and the line saying so. On such a card the graphs' private pool is what runs out: capped at 14 GiB on an
    H200, the 1.7B recipe's rows were capped at 4,224 tokens and the pool then held 10.1 GiB (4.5 in use, 5.6
    cached for the captured graphs) beside the default pool's 3.8, out of memory at the first steps
    (bench/RESULTS.md run 15)."""
    import dataclasses

    if not (rt.step_graphs or rt.eval_graphs) or args.cuda_graphs != "auto":
        return rt, None
    return dataclasses.replace(rt, step_graphs=False, eval_graphs=False), (
        "memory: CUDA graphs off on this card (their private memory pool does not fit beside capped rows; "
        "--cuda_graphs on forces them)")


def autocast(device, amp_dtype):
    """Autocast to `amp_dtype` on `device` (off when None), for every forward of the toolkit. Its cache of cast
    weights is off: a CUDA graph must not keep cached casts, and each weight is cast once per forward anyway."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                          cache_enabled=False)
