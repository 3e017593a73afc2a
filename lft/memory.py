"""GPU memory planning: what this process may use, and the largest packed training row that fits in it.

At start-up train_lora.py runs one forward/backward of the largest row the run can meet (the memory probe). Its
peak, less what was allocated before it (weights, optimizer state), divided by its tokens, is the memory one
token of a row needs; the budget is the card's memory, or the cap of
`torch.cuda.set_per_process_memory_fraction`, less what other processes hold. When a row of
--max_tokens_per_row tokens does not fit, training rows are capped at the largest width that does, and
micro-batches over it are split at text boundaries: the loss is a weighted sum over the step's texts, so the
gradient is the same (up to summation order); only the row widths change. With CUDA graphs, one step of the
widest allowed row then runs in the graphs' memory pool (train_lora.reserve_graph_pool), so on such a card the
pool is sized once instead of growing as wider rows appear. When even one text of --max_length tokens does not
fit, the run stops at once, naming the flags to change.

    budget = memory.budget(device)
    plan = memory.plan_rows(probe, budget, want=args.max_tokens_per_row, max_length=args.max_length)
"""
from __future__ import annotations

import dataclasses

from .data import TRAIN_ROW_STEP as ROW_STEP  # training rows come in widths of this many tokens

GIB = 2 ** 30
HEADROOM = 0.15  # of the budget: allocator slack (reserved 13.6 GiB for 12.7 allocated uncapped on an H200),
# cuBLAS/flash workspaces, the eager backward's temporaries; 0.10 ran out of memory under a 14 GiB cap
EVAL_SHARE = 0.25  # an evaluation row (no gradients) needs about this share of a training row's memory per token


@dataclasses.dataclass(frozen=True)
class Probe:
    """One measured forward/backward: `tokens` in the row, bytes allocated before it, peak bytes during it."""
    tokens: int
    before: int
    peak: int

    @property
    def per_token(self) -> float:
        return max(self.peak - self.before, 0) / max(self.tokens, 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    row_tokens: int  # the cap on a training row's tokens (<= the wanted --max_tokens_per_row)
    need: int  # predicted peak bytes with rows of that width
    budget: int
    note: str | None  # a line for the log when rows were capped, else None


def budget(device) -> int:
    """Bytes this process may hold on `device`: the per-process cap (set_per_process_memory_fraction) or the
    card, whichever is smaller than what is free now plus what this process already holds."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    fraction = torch.cuda.get_per_process_memory_fraction(device) \
        if hasattr(torch.cuda, "get_per_process_memory_fraction") else 1.0
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(total * fraction, free + torch.cuda.memory_reserved(device)))


def need(probe: Probe, row_tokens: int, eval_tokens: int) -> int:
    """Predicted peak bytes of training rows of `row_tokens` with evaluation rows of `eval_tokens`: what was held
    before the probe, plus the larger of the two rows' activations (they share one graph pool)."""
    act = probe.per_token * max(row_tokens, EVAL_SHARE * eval_tokens)
    return int(probe.before + act)


def plan_rows(probe: Probe, budget_bytes: int, want: int, max_length: int, eval_tokens: int = 0,
              step: int = ROW_STEP) -> Plan:
    """The widest training row (a multiple of `step`, at most `want`, at least `max_length`) whose predicted peak
    stays within the budget less HEADROOM. Raises MemoryError when a single text of max_length does not fit."""
    usable = budget_bytes * (1 - HEADROOM)
    if need(probe, want, eval_tokens) <= usable:
        return Plan(want, need(probe, want, eval_tokens), budget_bytes, None)
    room = (usable - probe.before) / max(probe.per_token, 1.0)
    if room >= EVAL_SHARE * eval_tokens:  # the evaluation rows fit: the training rows set the cap
        tokens = int(room) // step * step
    else:
        tokens = 0
    if tokens < max_length:
        raise MemoryError(
            f"{budget_bytes / GIB:.1f} GiB available; the model and optimizer hold {probe.before / GIB:.1f} GiB and "
            f"each token of a training row needs {probe.per_token / 2 ** 20:.2f} MiB, so not even one text of "
            f"--max_length {max_length} tokens fits (with evaluation rows of {eval_tokens} tokens)")
    tokens = min(tokens, want)
    return Plan(tokens, need(probe, tokens, eval_tokens), budget_bytes,
                f"memory: {budget_bytes / GIB:.1f} GiB available; rows of {want:,} tokens would need "
                f"{need(probe, want, eval_tokens) / GIB:.1f} GiB, so training rows are capped at {tokens:,} tokens "
                "(micro-batches over it are split between texts; the gradient is the same)")
