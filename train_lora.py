"""LoRA-fine-tune a local Qwen3 checkpoint into a text classifier (default: 6 content-safety labels).

One GPU (bf16 is the default on a GPU):
    python train_lora.py --checkpoint /path/to/Qwen3-1.7B --train_data balanced_train.xlsx \
        --val_data balanced_val.xlsx --test_data test_data.xlsx --output_dir ./lora_model \
        --num_epochs 3 --batch_size 18 --learning_rate 5e-5 --max_length 256 --bf16
Several GPUs (DDP; the same flags, --batch_size is per GPU):
    torchrun --nproc_per_node=4 train_lora.py ...same flags...
CPU demo (tiny local checkpoint, synthetic data, < 2 minutes):
    python -m lft.demo

Writes to --output_dir: best_model/ (adapter with the best validation macro-F1), checkpoint-<step>/
(everything needed by --resume_from_checkpoint), args.json, metrics.jsonl, and test_results.json when
--test_data is given.

Interrupted (crash, kill -9, out of time)? Run the same command plus --resume_from_checkpoint auto: it
continues from the newest complete checkpoint and ends with the same adapter and metrics. SIGTERM and Ctrl-C
save a checkpoint at the next step and exit 143 / 130. Under torchrun --max_restarts, put
--resume_from_checkpoint auto in the command from the start. Bad input exits 2 with one line on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import qwen3_classification_direct as qcd
from lft import checkpoint as C
from lft import data as D
from lft.common import ArgumentParser, UserError, explain_oom, redact, run_cli, write_json
from lft.dist import Dist, all_reduce_sum, barrier, cleanup, print0, setup_distributed
from lft.metrics import format_report, metrics_from_confusion


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- data
    p.add_argument("--train_data", required=True, help="training table (.xlsx/.csv/.jsonl/.parquet)")
    p.add_argument("--val_data", required=True, help="validation table; picks best_model by macro-F1")
    p.add_argument("--test_data", default=None, help="optional test table, evaluated with best_model at the end")
    p.add_argument("--text_column", default="text_cn", help="column holding the text")
    p.add_argument("--label_column", default="extracted_label", help="column holding the label (name or id)")
    p.add_argument("--labels", default=None, help="comma-separated label names in id order "
                   f"(default: {','.join(D.DEFAULT_LABELS)})")
    p.add_argument("--max_length", type=int, default=256, help="tokens kept per text (longer ones are cut)")
    p.add_argument("--dedup", action="store_true", help="drop repeated texts within train and val, and train/val "
                   "texts that are also in a later split (test is never changed); without it they are reported")
    # --- model
    p.add_argument("--checkpoint", required=True, help="local Qwen3 model folder (e.g. Qwen3-1.7B)")
    p.add_argument("--pooling", choices=("last", "mean"), default="last", help="text vector: last real token or mean")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout before the classification head")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora_alpha", type=int, default=16, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input")
    p.add_argument("--lora_target_modules", default=",".join(qcd.LORA_TARGETS), help="modules that get LoRA")
    p.add_argument("--attn_implementation", default="auto", choices=("auto", "sdpa", "eager", "varlen"),
                   help="attention kernel (auto: varlen flash attention for packed rows on CUDA, else sdpa)")
    # --- optimisation
    p.add_argument("--num_epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=18, help="texts per micro-batch per process")
    p.add_argument("--gradient_accumulation_steps", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of steps with linear warmup")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    p.add_argument("--class_weights", choices=("none", "balanced"), default="none",
                   help="'balanced' weights the loss by inverse label frequency in the training set")
    p.add_argument("--seed", type=int, default=42, help="seeds head init, dropout and data order")
    p.add_argument("--fp16", action="store_true", help="fp16 autocast + GradScaler (fp32 trainable weights)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and autocast (default on a GPU)")
    p.add_argument("--fp32", action="store_true", help="full fp32 even on a GPU")
    p.add_argument("--packing", choices=("auto", "on", "off"), default="auto",
                   help="pack each micro-batch into one row without padding (auto: on for CUDA)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the decoder layers (auto: on for CUDA; ~2x faster on an H200)")
    p.add_argument("--cuda_graphs", choices=("auto", "on", "off"), default="auto",
                   help="replay each training/eval step as a CUDA graph over fixed-shape packed rows (auto: on with "
                        "CUDA + packing, training steps in single-process runs without --fp16)")
    p.add_argument("--max_tokens_per_row", type=int, default=None,
                   help="with packing: a process's accumulation micro-batches share rows of up to this many tokens "
                        "(default batch_size x max_length, so no row needs more memory than a padded batch)")
    p.add_argument("--no_group_by_length", dest="group_by_length", action="store_false",
                   help="plain shuffled batches instead of length-grouped ones")
    p.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="stop (exit 2, best_model kept) after this many consecutive steps with a non-finite loss")
    # --- evaluation, saving, logging
    p.add_argument("--output_dir", required=True)
    p.add_argument("--eval_steps", type=int, default=200, help="evaluate on --val_data every N optimizer steps")
    p.add_argument("--save_steps", type=int, default=None, help="checkpoint every N steps (default: eval_steps)")
    p.add_argument("--save_total_limit", type=int, default=2, help="checkpoint-* folders kept (newest)")
    p.add_argument("--eval_batch_size", type=int, default=None, help="texts per eval batch (default 2x batch)")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-* folder, or 'auto': the newest complete one in --output_dir (none: start)")
    p.add_argument("--merge", action="store_true", help="also write best_model_merged/ (plain transformers model)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no_progress", action="store_true", help="no progress bars (logs only)")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args) -> None:
    """Every flag problem at once, in one line."""
    problems = []
    for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "eval_steps", "logging_steps",
                 "lora_r", "lora_alpha", "max_nonfinite_steps", "save_total_limit"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1")
    if args.max_tokens_per_row is not None and args.max_tokens_per_row < 1:
        problems.append("--max_tokens_per_row must be >= 1")
    if args.max_length < 2:
        problems.append("--max_length must be >= 2")
    if not args.learning_rate > 0:
        problems.append("--learning_rate must be > 0")
    for name in ("dropout", "lora_dropout", "warmup_ratio"):
        if not 0 <= getattr(args, name) < 1:
            problems.append(f"--{name} must be in [0, 1)")
    if sum([args.fp16, args.bf16, args.fp32]) > 1:
        problems.append("--fp16, --bf16 and --fp32 exclude each other")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device visible")
    if args.bf16 and args.device != "cpu" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        problems.append("--bf16: this GPU has no bf16; use --fp16")
    for flag in ("train_data", "val_data", "test_data"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            problems.append(f"--{flag} {path}: file not found")
    if problems:
        raise UserError("; ".join(problems))
    args.save_steps = args.save_steps or args.eval_steps
    args.max_tokens_per_row = args.max_tokens_per_row or args.batch_size * args.max_length
    args.eval_batch_size = args.eval_batch_size or 2 * args.batch_size


# --- data -------------------------------------------------------------------------------------------------

def load_data(args, labels) -> dict[str, D.Split]:
    """Read and check every row of every split (fast); warnings are printed, errors raised."""
    splits = {name: D.load_split(path, labels, args.text_column, args.label_column)
              for name in ("train", "val", "test") if (path := getattr(args, f"{name}_data"))}
    splits, notes = D.check_splits(splits, labels, args.dedup)
    for line in [n for s in splits.values() for n in s.notes] + notes:
        print0(f"warning: {line}")
    return splits


def tokenize_data(splits: dict[str, D.Split], tokenizer, args, d: Dist) -> None:
    for name, split in splits.items():
        seen = len(split.notes)
        D.tokenize_split(split, tokenizer, args.max_length, desc=f"tokenise {name}",
                         show=d.main and not args.no_progress)
        for line in split.notes[seen:]:
            print0(f"warning: {line}")


def memory_probe(model, args, packing: bool, amp_dtype, pad_id: int, d: Dist) -> None:
    """On a GPU, one forward/backward of the largest micro-batch the run can meet (batch_size texts of
    max_length tokens, or with packing the largest row accumulation can make) before the texts are tokenised: running out of memory shows in seconds, not after data
    preparation. Gradients are dropped; the RNG is re-seeded afterwards, so the run is unchanged."""
    if d.device.type != "cuda":
        return
    n = args.batch_size
    if packing:  # a process's accumulation micro-batches may share one row, up to --max_tokens_per_row
        n = max(n, min(n * args.gradient_accumulation_steps, args.max_tokens_per_row // args.max_length))
    seqs = [[pad_id] * args.max_length for _ in range(n)]
    enc = D.to_device(D.collate_packed(seqs) if packing else D.collate_padded(seqs, pad_id), d.device)
    with explain_oom(f"one micro-batch of --batch_size {args.batch_size} x --max_length {args.max_length} "
                     "tokens does not fit: lower either (raise --gradient_accumulation_steps to keep the batch)"):
        with qcd.autocast(d.device, amp_dtype):
            model(**enc).float().sum().backward()
        torch.cuda.synchronize(d.device)
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()


def class_weights(args, train: D.Split, num_labels: int):
    if args.class_weights == "none":
        return None
    counts = np.bincount(train.labels, minlength=num_labels).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (num_labels * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def banner(args, splits, labels, steps_per_epoch, total_steps, d, precision_reason, packing, params, tokenizer,
           graphs: str):
    lines = ["=" * 78, f"base model      {args.checkpoint}", f"precision       {precision_reason}",
             f"processes       {d.world} on {d.device.type}" + (" (DDP)" if d.enabled else ""),
             f"packing         {'on: one row per micro-batch, no padding' if packing else 'off: padded batches'}",
             f"cuda graphs     {graphs}",
             f"parameters      {params[0]:,} total, {params[1]:,} trainable ({100 * params[1] / params[0]:.3f}%)"]
    for name, s in splits.items():
        counts = np.bincount(s.labels, minlength=len(labels))
        per = ", ".join(f"{n} {c}" for n, c in zip(labels, counts))
        lines.append(f"{name:<15} {len(s):,} texts ({per}); {s.n_truncated} cut to {args.max_length} tokens; "
                     f"mean {s.lengths.mean():.0f} tokens")
    eff = args.batch_size * args.gradient_accumulation_steps * d.world
    lines += [f"batch           {args.batch_size} x {args.gradient_accumulation_steps} accumulation x {d.world} "
              f"processes = {eff} texts per optimizer step",
              f"steps           {steps_per_epoch} per epoch x {args.num_epochs} epochs = {total_steps}; "
              f"eval every {args.eval_steps}, save every {args.save_steps}", "=" * 78]
    train = splits["train"]
    for i in range(min(3, len(train))):
        lines.append(f"sample {i}: label={labels[train.labels[i]]} tokens={len(train.input_ids[i])} "
                     f"text={tokenizer.decode(train.input_ids[i][:48])!r}")
    print0("\n".join(lines))


# --- evaluation -------------------------------------------------------------------------------------------

def evaluate(model, split: D.Split, labels, args, d: Dist, packing: bool, amp_dtype, pad_id, graphs=False) -> dict:
    """Each rank predicts a disjoint shard; confusion matrices are summed over ranks (counts, not means)."""
    batches = D.eval_batches(split.lengths, d.rank, d.world, max_tokens=args.eval_batch_size * args.max_length,
                             packed=graphs)
    probs = qcd.predict_probs(model, split.input_ids, batches, d.device, pad_id, packing, amp_dtype, graphs,
                              args.max_length)
    idx = np.fromiter(probs.keys(), dtype=np.int64, count=len(probs))
    pred = torch.stack(list(probs.values())).argmax(-1).numpy() if len(probs) else np.empty(0, dtype=np.int64)
    from lft.metrics import confusion

    cm = torch.from_numpy(confusion(split.labels[idx], pred, len(labels))).to(torch.int64)
    cm = all_reduce_sum(cm.to(d.device), d).cpu().numpy()  # every rank
    return metrics_from_confusion(cm, labels)


def micro_loss(forward, enc: dict, y, w, amp_dtype, device) -> torch.Tensor:
    """sum_k w_k * cross-entropy(text k), w_k = class weight / the step's weight sum (0 for the unused slots of a
    fixed-shape row), so a step's micro-batches add up to the mean over its texts."""
    with qcd.autocast(device, amp_dtype):
        logits = forward(**enc)
    return (F.cross_entropy(logits, y, reduction="none") * w).sum()


def train_graphs(model, amp_dtype, d: Dist):
    """CUDA graphs of one micro-batch's forward, loss and backward (lft/cuda_graphs.py). The backward adds
    into gradient tensors that exist before any capture, so replays accumulate like eager backward calls."""
    from lft.cuda_graphs import RowGraphs

    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)

    def step(s):
        enc = {k: s[k] for k in ("input_ids", "position_ids", "cu_seqlens", "max_len")}
        loss = micro_loss(model, enc, s["y"], s["w"], amp_dtype, d.device)
        (loss * d.world).backward()
        return loss.detach()

    return RowGraphs(step, d.device, neutral=lambda s: s["w"].zero_())  # the warm-up run adds exactly 0


class LaggedFlags:
    """Per-step flags, all-reduced on the device (so every rank decides alike), read on the host.

    On CUDA they are read one step late: the copy is queued behind step N and read after step N+1 has been
    queued, when the GPU is done with N, so reading never drains the queue and the CPU stays a step ahead.
    On CPU there is no queue to protect: they are read at once."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending = None

    def push(self, step: int, flags: torch.Tensor):
        """(step, [flags]) of the newest step that can be read without waiting; (None, None) if none."""
        if not self.cuda:
            return step, flags.tolist()
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        ready, self.pending = self.pending, (step, host, event)
        return self._read(ready)

    def flush(self):
        ready, self.pending = self.pending, None
        return self._read(ready)

    @staticmethod
    def _read(entry):
        if entry is None:
            return None, None
        step, host, event = entry
        event.synchronize()
        return step, host.tolist()


def check_nonfinite(state: dict, step: int, args) -> None:
    if state["nonfinite_run"] >= args.max_nonfinite_steps:
        kept = f"best_model (step {state['best_step']}) is intact" if state["best_step"] else "no best_model"
        raise UserError(f"{state['nonfinite_run']} consecutive steps with a non-finite loss (the last at step "
                        f"{step}); lower --learning_rate, or use --bf16 instead of --fp16 "
                        f"({kept}; --max_nonfinite_steps sets the limit)")


OOM_FIX = ("lower --batch_size (raise --gradient_accumulation_steps to keep the effective batch), --max_length, "
           "--max_tokens_per_row (packing) or --eval_batch_size (evaluation)")


# --- the loop ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    d = setup_distributed(args.device)
    try:
        with explain_oom(OOM_FIX), C.StopRequest() as stop:
            return train(args, d, stop)
    finally:
        cleanup()


def train(args, d: Dist, stop: C.StopRequest) -> int:
    from tqdm.auto import tqdm

    labels = D.parse_labels(args.labels)
    out = Path(args.output_dir)
    weight_dtype, amp_dtype, use_scaler, precision_reason = qcd.choose_precision(args, d.device)
    packing = qcd.on_for_cuda(args.packing, d.device)
    attn = qcd.choose_attention(args.attn_implementation, packing, d.device)
    graphs = qcd.use_cuda_graphs(args.cuda_graphs, d.device, packing, attn)  # evaluation
    # training steps too, except under DDP (its hooks all-reduce inside backward) and fp16 (GradScaler)
    step_graphs = graphs and not d.enabled and not use_scaler
    # check everything that can be wrong before writing anything, cheapest first: the base model's files, the
    # output folder, the checkpoint to resume, every data row; then the model on the device (and one worst-case
    # step on a GPU) and the disk space for its checkpoints; only then tokenise
    qcd.check_checkpoint(args.checkpoint)  # reads only headers, before importing transformers (seconds)
    C.check_output_dir(out, resuming=bool(args.resume_from_checkpoint))
    resume = C.find_checkpoint(args.resume_from_checkpoint, out)  # the newest that verifies; corrupt: skipped
    if resume is not None:
        C.check_resume_args(resume, args, labels, d.world)
    splits = load_data(args, labels)
    train_split, val_split = splits["train"], splits["val"]
    tokenizer = qcd.load_tokenizer(args.checkpoint)
    pad_id = tokenizer.pad_token_id

    torch.manual_seed(args.seed)  # same head init on every rank
    model, identity = qcd.build_classifier(
        args.checkpoint, labels, args.dropout, args.pooling, weight_dtype, attn,
        lora=dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                  targets=[t.strip() for t in args.lora_target_modules.split(",") if t.strip()]))
    with explain_oom("the base model alone does not fit on this GPU: use --bf16 or a smaller Qwen3"):
        model.to(d.device)
    if qcd.on_for_cuda(args.compile, d.device):
        qcd.compile_decoder_layers(model)
    memory_probe(model, args, packing, amp_dtype, pad_id, d)
    C.check_free_space(out, qcd.count_parameters(model)[1], args.save_total_limit)
    tokenize_data(splits, tokenizer, args, d)

    def epoch_steps(epoch):
        batches = D.length_grouped_batches(train_split.lengths, args.batch_size, args.seed, epoch,
                                           args.group_by_length)
        return D.training_steps(batches, args.gradient_accumulation_steps, d.world)

    steps_per_epoch = len(epoch_steps(0))
    if steps_per_epoch == 0:
        raise UserError(f"--train_data {args.train_data}: {len(train_split)} texts are fewer than one micro-batch "
                        f"per process ({d.world} processes); lower --batch_size")
    total_steps = steps_per_epoch * args.num_epochs
    if d.main:
        with C.writing("args.json", out):
            out.mkdir(parents=True, exist_ok=True)
            for line in C.clean_stale(out):
                print0(f"note: {line}")
            write_json(out / "args.json", C.safe_args(args))  # never a password, whatever the arguments hold
    params = qcd.count_parameters(model)
    banner(args, splits, labels, steps_per_epoch, total_steps, d, precision_reason, packing, params, tokenizer,
           "training steps and evaluation" if step_graphs else "evaluation" if graphs else "off")

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    fused = d.device.type == "cuda"  # one multi-tensor kernel, which can skip a non-finite update by itself
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate, fused=fused)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(d.device.type, enabled=use_scaler)
    cw = class_weights(args, train_split, len(labels))

    meta = {"labels": list(labels), "id2label": {i: n for i, n in enumerate(labels)},
            "max_length": args.max_length, "base": identity,
            "args": C.safe_args(args), "metrics": None}
    state = {"global_step": 0, "best_metric": None, "best_step": None, "nonfinite_run": 0}
    if resume is not None:
        state.update(C.load_checkpoint(resume, model, qcd.load_adapter_weights, optimizer, scheduler, scaler, d))
        print0(f"resumed from {resume} at step {state['global_step']}")
    else:
        torch.manual_seed(args.seed + d.rank)  # dropout masks differ per rank

    ddp = model
    if d.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    model.train()
    if d.main:  # records after the resumed step were written by the interrupted run: they are redone
        C.truncate_log(out / "metrics.jsonl", state["global_step"])
    metrics_log = (out / "metrics.jsonl").open("a", encoding="utf-8") if d.main else None

    def log(record: dict) -> None:
        if metrics_log:
            with C.writing("metrics.jsonl", out):
                metrics_log.write(json.dumps(record, ensure_ascii=False) + "\n")
                metrics_log.flush()

    def run_eval(step: int) -> None:
        t0 = time.perf_counter()
        m = evaluate(model, val_split, labels, args, d, packing, amp_dtype, pad_id, graphs)
        seconds = time.perf_counter() - t0
        improved = state["best_metric"] is None or m["macro_f1"] > state["best_metric"]
        print0(f"eval step {step} | val accuracy {m['accuracy']:.4f} | val macro-F1 {m['macro_f1']:.4f}"
               + (" | new best" if improved else f" | best {state['best_metric']:.4f} at {state['best_step']}")
               + f" | {seconds:.1f} s")
        log({"step": step, "split": "val", **{k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1")},
             "seconds": seconds})
        if improved:
            state.update(best_metric=m["macro_f1"], best_step=step)
            if d.main:
                with C.writing("best_model", out):  # atomic: the previous best_model survives a failed write
                    qcd.save_adapter(model, out / "best_model", {**meta, "metrics": {"val": m, "step": step}})
        barrier(d)

    bar = tqdm(total=total_steps, initial=state["global_step"], desc="train", unit="step",
               disable=not d.main or args.no_progress, dynamic_ncols=True)
    loss_acc = torch.zeros((), device=d.device)
    samples_acc, tokens_acc, t_last, steps_since = 0, 0, time.perf_counter(), 0
    start_epoch = state["global_step"] // steps_per_epoch
    stop_now = False
    lagged = LaggedFlags(d.device)
    runner = train_graphs(model, amp_dtype, d) if step_graphs else None
    stop.listen()  # from here SIGTERM/Ctrl-C finish the step, save a checkpoint and exit
    for epoch in range(start_epoch, args.num_epochs):
        for i, step in enumerate(epoch_steps(epoch)):
            if epoch * steps_per_epoch + i < state["global_step"]:
                continue  # already done before the resume
            micro = step[d.rank::d.world]
            if packing:
                micro = D.merge_for_packing(micro, train_split.lengths, args.max_tokens_per_row)
            idx_all = [j for mb in step for j in mb]
            # loss = sum over the step's texts / their count (or weight sum): every rank knows the whole step,
            # so the normaliser is exact, and DDP's gradient averaging is undone by the factor world
            norm = float(cw[train_split.labels[idx_all]].sum()) if cw is not None else float(len(idx_all))
            step_loss = torch.zeros((), device=d.device)
            for k, mb in enumerate(micro):
                seqs = [train_split.input_ids[j] for j in mb]
                n_tokens = sum(len(s) for s in seqs)
                y = torch.as_tensor(train_split.labels[mb])
                w = (cw[y] if cw is not None else torch.ones(len(mb))) / norm
                if runner is not None:  # one graph replay: forward, loss and backward of a fixed-shape row
                    width, slots = D.static_shape(len(seqs), n_tokens, args.max_length)
                    enc = D.collate_packed_static(seqs, width, slots, args.max_length, pad_id)
                    enc.update(y=F.pad(y, (0, slots - len(mb))), w=F.pad(w, (0, slots - len(mb))))
                    step_loss += runner(enc)
                else:
                    enc = D.to_device(D.collate_packed(seqs) if packing else D.collate_padded(seqs, pad_id), d.device)
                    enc_y, enc_w = D.to_device({"y": y, "w": w}, d.device).values()
                    sync = k == len(micro) - 1
                    with (contextlib.nullcontext() if sync or not d.enabled else ddp.no_sync()):
                        loss = micro_loss(ddp, enc, enc_y, enc_w, amp_dtype, d.device)
                        scaler.scale(loss * d.world).backward()
                    step_loss += loss.detach()
                samples_acc += len(mb)
                tokens_acc += n_tokens
            loss_acc += step_loss
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm if args.max_grad_norm > 0 else 1e30)
            bad_grad = ~torch.isfinite(grad_norm)
            if use_scaler:
                scaler.step(optimizer)  # skips the update itself when the scaled gradients overflowed
            elif fused:
                optimizer.found_inf = bad_grad.float()  # the fused kernel skips the update on the device: no sync
                optimizer.step()
            elif not bool(bad_grad):
                optimizer.step()
            # with a GradScaler, overflowing gradients alone are its business: it skipped the step, lowers the scale
            flags = torch.stack([(~torch.isfinite(step_loss)).float(), bad_grad.float() * (not use_scaler),
                                 torch.full((), float(stop.signum is not None), device=d.device)])
            flag_step, host = lagged.push(state["global_step"] + 1, all_reduce_sum(flags, d))  # every rank
            if host is not None:
                stop_now = host[2] > 0
                state["nonfinite_run"] = state["nonfinite_run"] + 1 if host[0] > 0 or host[1] > 0 else 0
                check_nonfinite(state, flag_step, args)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=runner is None)  # graphs add into the same gradient tensors
            state["global_step"] += 1
            steps_since += 1
            gs = state["global_step"]
            bar.update(1)

            if gs % args.logging_steps == 0 or gs == total_steps:
                loss = float(all_reduce_sum(loss_acc, d)) / steps_since  # every rank
                dt = time.perf_counter() - t_last
                rate = samples_acc * d.world / dt
                line = (f"step {gs}/{total_steps} | epoch {gs / steps_per_epoch:.2f} | loss {loss:.4f} | "
                        f"lr {scheduler.get_last_lr()[0]:.2e} | grad_norm {float(grad_norm):.3f} | "
                        f"{1000 * dt / steps_since:.0f} ms/step | {rate:.1f} samples/s | "
                        f"{tokens_acc * d.world / dt:.0f} tokens/s")
                if d.main:
                    bar.write(line) if not args.no_progress else print(line, flush=True)
                log({"step": gs, "epoch": gs / steps_per_epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
                     "grad_norm": float(grad_norm), "ms_per_step": 1000 * dt / steps_since, "samples_per_s": rate,
                     "tokens_per_s": tokens_acc * d.world / dt})
                loss_acc.zero_()
                samples_acc, tokens_acc, t_last, steps_since = 0, 0, time.perf_counter(), 0
            if gs % args.eval_steps == 0 or gs == total_steps:
                run_eval(gs)
            if gs % args.save_steps == 0 or gs == total_steps or stop_now:
                C.save_checkpoint(out / f"checkpoint-{gs}", lambda folder: qcd.save_adapter(model, folder, meta),
                                  optimizer, scheduler, scaler, dict(state), d)
                if d.main:
                    C.rotate_checkpoints(out, args.save_total_limit)
                t_last = time.perf_counter()  # eval/save time is not training throughput
            if stop_now:
                break
        if stop_now:
            break
    flag_step, host = lagged.flush()  # the last step's flags, on CUDA
    if host is not None:
        state["nonfinite_run"] = state["nonfinite_run"] + 1 if host[0] > 0 or host[1] > 0 else 0
        check_nonfinite(state, flag_step, args)
    stop.release()
    bar.close()
    if metrics_log:
        metrics_log.close()
    if stop_now:
        print0(f"stopped by {stop.name} at step {state['global_step']}/{total_steps}; checkpoint saved. Resume with "
               "the same command plus --resume_from_checkpoint auto")
        return 128 + (stop.signum or signal.SIGTERM)  # 143 (SIGTERM) / 130 (Ctrl-C): a scheduler sees "not done"
    print0(f"training done: best val macro-F1 {state['best_metric']:.4f} at step {state['best_step']}; "
           f"adapter in {out / 'best_model'}")

    if args.test_data or args.merge:
        best, tok, best_meta = qcd.load_classifier(args.checkpoint, out / "best_model", weight_dtype, attn)
        best.to(d.device)
        if args.test_data:
            m = evaluate(best, splits["test"], labels, args, d, packing, amp_dtype, pad_id, graphs)
            print0("test results (best_model):\n" + format_report(m))
            if d.main:
                write_json(out / "test_results.json", {"model": redact(out / "best_model"),
                                                       "test_data": redact(args.test_data),
                                                       "best_step": state["best_step"], **m})
        if args.merge and d.main:
            qcd.export_merged(best, tok, out / "best_model_merged", best_meta)
            print0(f"merged model in {out / 'best_model_merged'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
