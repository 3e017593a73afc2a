"""LoRA-fine-tune a local Qwen3 checkpoint into a text classifier (default: 6 content-safety labels).

One GPU (bf16 is the default on a GPU):
    python train_lora.py --checkpoint /path/to/Qwen3-1.7B --train_data balanced_train.xlsx \
        --val_data balanced_val.xlsx --test_data test_data.xlsx --output_dir ./lora_model \
        --num_epochs 3 --batch_size 18 --learning_rate 5e-5 --max_length 256 --bf16
Several GPUs (DDP; the same flags, --batch_size is per GPU):
    torchrun --nproc_per_node=4 train_lora.py ...same flags...
CPU demo (tiny local checkpoint, synthetic data, < 1 minute):
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
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lft.common import (ArgumentParser, Background, HelpFormatter, UserError, check_python, exit_script,
                        explain_oom, lazy_import, redact, safe_args, seconds_since_launch, write_json)

check_python()  # before torch and transformers, whose own failure on an old Python is far from the cause
# torch and everything built on it load on first use: --help and flag errors answer at once
np = lazy_import("numpy")
torch = lazy_import("torch")

from lft.config import describe_sources, parse_args_with_config  # noqa: E402
from lft.early_stopping import EarlyStopping, add_early_stopping_args, check_early_stopping_args  # noqa: E402
from lft.labels import DEFAULT_LABELS, parse_labels  # noqa: E402
from lft.runtime import add_runtime_args, check_runtime_args  # noqa: E402
from lft.signals import StopRequest, announce_signals  # noqa: E402
from lft.tracking import Tracker, add_tracking_args, check_tracking_args  # noqa: E402

qcd = lazy_import("qwen3_classification_direct")
adapter, base, C, D, M = (lazy_import(f"lft.{m}") for m in ("adapter", "base", "checkpoint", "data", "memory"))
dist, metrics, outdir, predict, R, train_step = (lazy_import(f"lft.{m}") for m in (
    "dist", "metrics", "outdir", "predict", "runtime", "train_step"))

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"
MERGE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: the base checkpoint's dtype (lft.adapter)
# flags that only change the result: resuming with other values still works, with a warning that the run will
# not equal an uninterrupted one (labels, pooling and the LoRA layout must match: lft.checkpoint.check_resume)
RECIPE_FLAGS = ("train_data", "batch_size", "gradient_accumulation_steps", "num_epochs", "seed", "max_length",
                "learning_rate", "warmup_ratio", "weight_decay", "class_weights", "group_by_length", "dedup",
                "lora_alpha", "lora_dropout", "dropout", "max_tokens_per_row", "packing")
OOM_FIX = ("lower --batch_size (raise --gradient_accumulation_steps to keep the effective batch), --max_length, "
           "--max_tokens_per_row (packing) or --eval_batch_size (evaluation)")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train_data", required=True, help="training table (.xlsx/.csv/.jsonl/.parquet)")
    g.add_argument("--val_data", required=True, help="validation table; picks best_model by macro-F1")
    g.add_argument("--test_data", default=None, help="optional test table, evaluated with best_model at the end")
    g.add_argument("--text_column", default="text_cn", help="column holding the text")
    g.add_argument("--label_column", default="extracted_label", help="column holding the label (name or id)")
    g.add_argument("--labels", default=None, help=f"comma-separated label names in id order "
                   f"(default: {','.join(DEFAULT_LABELS)})")
    g.add_argument("--max_length", type=int, default=256, help="tokens kept per text (longer ones are cut)")
    g.add_argument("--dedup", action="store_true", help="drop repeated texts within train and val, and train/val "
                   "texts that are also in a later split (test is never changed); without it they are reported")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="local Qwen3 model folder (e.g. Qwen3-1.7B)")
    g.add_argument("--pooling", choices=("last", "mean"), default="last", help="text vector: last real token or mean")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout before the classification head")
    g.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    g.add_argument("--lora_alpha", type=int, default=16, help="LoRA alpha (scale = alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input")
    g.add_argument("--lora_target_modules", default=LORA_TARGETS, help="modules that get LoRA")
    g = p.add_argument_group("optimisation")
    g.add_argument("--num_epochs", type=int, default=3)
    g.add_argument("--batch_size", type=int, default=18, help="texts per micro-batch per process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=2, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of steps with linear warmup")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    g.add_argument("--class_weights", choices=("none", "balanced"), default="none",
                   help="'balanced' weights the loss by inverse label frequency in the training set")
    g.add_argument("--seed", type=int, default=42, help="seeds head init, dropout and data order")
    g.add_argument("--max_tokens_per_row", type=int, default=None,
                   help="with packing: a process's accumulation micro-batches are packed into rows of up to this "
                        "many tokens (default batch_size x max_length, so no row needs more memory than a padded "
                        "batch)")
    g.add_argument("--no_group_by_length", dest="group_by_length", action="store_false",
                   help="plain shuffled batches instead of length-grouped ones")
    g.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="stop (exit 2, best_model kept) after this many consecutive steps with a non-finite loss")
    add_runtime_args(p)
    g = p.add_argument_group("evaluation, saving, logging")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--eval_steps", type=int, default=200, help="evaluate on --val_data every N optimizer steps")
    g.add_argument("--save_steps", type=int, default=None, help="checkpoint every N steps (default: eval_steps)")
    g.add_argument("--save_total_limit", type=int, default=2, help="checkpoint-* folders kept (newest)")
    g.add_argument("--eval_batch_size", type=int, default=None, help="texts per eval batch (default 2x batch)")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-* folder, or 'auto': the newest complete one in --output_dir (none: start)")
    g.add_argument("--merge", action="store_true", help="also write best_model_merged/ (plain transformers model)")
    g.add_argument("--merge_dtype", choices=MERGE_DTYPES, default="auto",
                   help="dtype of best_model_merged/ (auto: the base checkpoint's dtype)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars (logs only)")
    add_early_stopping_args(p)
    add_tracking_args(p)
    args, args._sources = parse_args_with_config(p, argv)  # --config FILE: defaults < file < command line
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
    if not 0 < args.learning_rate <= 1:  # also catches nan and inf; 5e5 is a typo for 5e-5
        problems.append(f"--learning_rate {args.learning_rate} must be in (0, 1] (the original recipe uses 5e-5)")
    if not 0 <= args.weight_decay < 1:
        problems.append("--weight_decay must be in [0, 1)")
    if not (args.max_grad_norm >= 0 and math.isfinite(args.max_grad_norm)):
        problems.append("--max_grad_norm must be >= 0 (0 disables clipping)")
    if not 0 <= args.seed < 2**31:
        problems.append("--seed must be in [0, 2^31)")
    for name in ("dropout", "lora_dropout", "warmup_ratio"):
        if not 0 <= getattr(args, name) < 1:
            problems.append(f"--{name} must be in [0, 1)")
    targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    if not targets:
        problems.append("--lora_target_modules names no module (e.g. q_proj,k_proj,v_proj,o_proj)")
    if args.merge and args.pooling == "mean":
        problems.append("--merge exports transformers' Qwen3ForSequenceClassification, which pools the last token: "
                        "it cannot hold a --pooling mean model (use predict.py with the adapter instead)")
    check_runtime_args(args, problems)
    check_early_stopping_args(args, problems)
    check_tracking_args(args, problems)
    for flag in ("train_data", "val_data", "test_data"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            problems.append(f"--{flag} {path}: file not found")
    if problems:
        raise UserError("; ".join(problems))
    args.save_steps = args.save_steps or args.eval_steps
    args.max_tokens_per_row = args.max_tokens_per_row or args.batch_size * args.max_length
    args.eval_batch_size = args.eval_batch_size or 2 * args.batch_size


# --- set-up ---------------------------------------------------------------------------------------------

def read_data(args, labels) -> "D.ReadInBackground":
    """Every row of every split read and checked: in a process of its own, started now, for large files (the
    original recipe's), in .result() otherwise."""
    paths = {name: path for name in ("train", "val", "test") if (path := getattr(args, f"{name}_data"))}
    return D.ReadInBackground(paths, labels, args.text_column, args.label_column, args.dedup)


def load_data(reading: "D.ReadInBackground") -> dict[str, D.Split]:
    """The splits read_data read; warnings are printed, errors raised."""
    splits, warnings = reading.result()
    for line in warnings:
        dist.print0(f"warning: {line}")
    return splits


def tokenize_data(splits: dict[str, D.Split], tokenizer, args, d: "dist.Dist", show: bool = True) -> list[str]:
    """Tokenise every split (lft.data.tokenize_split, in parallel threads); the warnings it raised, to print."""
    warnings = []
    for name, split in splits.items():
        seen = len(split.notes)
        D.tokenize_split(split, tokenizer, args.max_length, desc=f"tokenise {name}",
                         show=show and d.main and not args.no_progress)
        warnings += split.notes[seen:]
    return warnings


def estimated_tokens(splits: dict, args, world: int) -> int:
    """The real tokens one process will put through the model, before tokenising (a Chinese character is about
    one Qwen3 token): its share of the training texts every epoch, and of the validation texts at every
    evaluation. Enough to tell a few-minute job from a long one (lft.runtime.for_job)."""
    def chars(split) -> int:
        return sum(min(len(t), args.max_length) for t in split.texts)

    train = splits["train"]
    steps = max(1, len(train) // (args.batch_size * args.gradient_accumulation_steps * world)) * args.num_epochs
    evals = steps // args.eval_steps + 1
    return (chars(train) * args.num_epochs + chars(splits["val"]) * evals) // world


def lora_spec(args) -> dict:
    return dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                targets=[t.strip() for t in args.lora_target_modules.split(",") if t.strip()])


def memory_probe(model, args, rt: R.Runtime, pad_id: int) -> "M.Probe | None":
    """On a GPU, one forward/backward of the largest micro-batch the run can meet (batch_size texts of
    max_length tokens, or with packing the largest row accumulation can make) before the texts are tokenised,
    measured for the memory plan (lft/memory.py), in training mode (LoRA dropout keeps its masks for the
    backward, as in training; and the graph compiled here is the one training replays). With packing, a row that
    does not fit is halved until one does (the plan then caps the rows); running out of memory otherwise shows in
    seconds, as one line naming the flags. Gradients are dropped; the RNG is re-seeded afterwards, so the run is
    unchanged."""
    if rt.device.type != "cuda":
        return None
    n = probe_texts(args, rt)
    while True:
        seqs = [[pad_id] * args.max_length for _ in range(n)]
        enc = D.to_device(D.collate_packed(seqs) if rt.packing else D.collate_padded(seqs, pad_id), rt.device)
        try:
            with explain_oom(f"one text of --max_length {args.max_length} tokens does not fit (--batch_size "
                             f"{args.batch_size}): lower --max_length" if n == 1 or not rt.packing else
                             f"one micro-batch of --batch_size {args.batch_size} x --max_length {args.max_length} "
                             "tokens does not fit: lower either (raise --gradient_accumulation_steps to keep the "
                             "batch)"):
                probe = M.Probe(n * args.max_length, *_measured_step(model, enc, rt))
        except UserError:
            if n == 1 or not rt.packing:
                raise
            probe = None
        del enc
        torch.cuda.empty_cache()
        if probe is not None:
            return probe
        n //= 2  # packed rows can be narrower than a micro-batch: find one that fits, the plan does the rest


def probe_texts(args, rt: R.Runtime) -> int:
    """Texts (of --max_length tokens) in the memory probe's row: the largest micro-batch the run can meet."""
    n = args.batch_size
    if rt.packing:  # a process's accumulation micro-batches may share one row, up to --max_tokens_per_row
        n = max(n, min(n * args.gradient_accumulation_steps, args.max_tokens_per_row // args.max_length))
    return n


def warm_compile(args, rt: R.Runtime) -> "Background | None":
    """On a GPU, the decoder layers' training graph compiled in a thread while the model loads
    (qcd.warm_compile): its result() is awaited before the model's first compiled forward. None where nothing
    compiles (compile off, a small job) or rows are not packed."""
    if not (rt.compile and rt.packing and rt.device.type == "cuda"):
        return None
    config = qcd.read_config(args.checkpoint, rt.attn)
    return Background(lambda: qcd.warm_compile(config, rt.weight_dtype, lora_spec(args), probe_texts(args, rt),
                                               args.max_length, rt.device, lambda: R.autocast(rt.device, rt.amp_dtype)))


def _measured_step(model, enc: dict, rt: R.Runtime, pool: bool = False) -> tuple[int, int]:
    """(bytes allocated before, peak bytes during) one forward/backward of `enc` in training mode (`pool`: on
    the CUDA graphs' stream, with memory from their pool). Gradients are dropped; the mode is restored."""
    from lft import cuda_graphs

    was_training = model.training
    model.train()
    torch.cuda.synchronize(rt.device)
    before = torch.cuda.memory_allocated(rt.device)
    torch.cuda.reset_peak_memory_stats(rt.device)
    try:
        with cuda_graphs.in_graph_pool(rt.device) if pool else contextlib.nullcontext(), \
                R.autocast(rt.device, rt.amp_dtype):
            model(**enc).float().sum().backward()
        torch.cuda.synchronize(rt.device)
        return before, torch.cuda.max_memory_allocated(rt.device)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def reserve_graph_pool(model, args, rt: R.Runtime, row_tokens: int, pad_id: int, budget: int) -> int:
    """With training graphs on a card the wanted rows do not fit: one forward/backward of the widest row the plan
    allows, on the graphs' stream with memory from their pool (lft/cuda_graphs.py), so the pool is sized once for
    the largest row. Rows then reuse its blocks whatever order their widths come in, instead of adding segments as
    wider rows appear (a 14 GiB cap ran out of memory that way on an H200). Its measured peak checks the plan: a
    row that needs more than the budget less the headroom narrows the cap in proportion and runs again (at most
    3 times), so a card too small for the plan stops here, in seconds, not steps later. Returns the cap."""
    usable = budget * (1 - M.HEADROOM)
    for _ in range(3):
        n = max(1, row_tokens // args.max_length)
        enc = D.to_device(D.collate_packed([[pad_id] * args.max_length] * n), rt.device)
        with explain_oom(f"a row of {n * args.max_length} tokens does not fit after the memory plan; {OOM_FIX}"):
            before, peak = _measured_step(model, enc, rt, pool=True)
        del enc
        torch.cuda.empty_cache()
        if peak <= usable or row_tokens <= args.max_length:
            return row_tokens
        share = (usable - before) / max(peak - before, 1)  # activations scale with the row's tokens
        narrower = max(args.max_length, int(row_tokens * share) // M.ROW_STEP * M.ROW_STEP)
        dist.print0(f"note: memory: a row of {row_tokens:,} tokens peaked at {peak / M.GIB:.1f} GiB, over the "
                    f"{usable / M.GIB:.1f} GiB the plan allows; training rows are capped at {narrower:,} tokens")
        row_tokens = narrower
    return row_tokens


def plan_memory(probe, args, rt: R.Runtime, d) -> int:
    """The cap on training rows' tokens (lft/memory.py); --max_tokens_per_row unless the card is too small for
    it. Every process takes the smallest cap, so all split their micro-batches alike; the note printed is that
    process's, and a process whose card is too small stops every process (none is left waiting for it)."""
    if probe is None or not rt.packing:
        return args.max_tokens_per_row
    try:
        plan = M.plan_rows(probe, M.budget(rt.device), args.max_tokens_per_row, args.max_length,
                           eval_tokens=args.eval_batch_size * args.max_length)
        mine = (plan.row_tokens, plan.note)
    except MemoryError as e:
        mine = (None, f"out of GPU memory: {e}; {OOM_FIX}")
    plans = dist.gather_objects(mine, d)
    failed = [message for cap, message in plans if cap is None]
    if failed:
        raise UserError(failed[0])
    cap, note = min(plans, key=lambda p: p[0])
    if note:
        dist.print0(f"note: {note}")
    return cap


def class_weights(args, train: D.Split, num_labels: int):
    if args.class_weights == "none":
        return None
    counts = np.bincount(train.labels, minlength=num_labels).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (num_labels * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def linear_schedule(optimizer, warmup: int, total: int):
    """Linear warm-up to the learning rate over `warmup` steps, then linear decay to 0 at `total` (transformers'
    get_linear_schedule_with_warmup, the original's schedule, without importing transformers' optimisation
    module)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, args, rt: R.Runtime, total_steps: int):
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    # fused: one multi-tensor kernel, which can skip a non-finite update by itself (no host sync)
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, fused=rt.device.type == "cuda")
    scheduler = linear_schedule(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler, torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler)


def banner(args, splits, labels, steps_per_epoch, total_steps, d, rt: R.Runtime, params, tokenizer,
           row_tokens: int) -> None:
    row = "off: padded batches" if not rt.packing else \
        f"on: texts back to back in rows of <= {row_tokens} tokens, no padding" + (
            f" (--max_tokens_per_row {args.max_tokens_per_row}, capped to fit the GPU's memory)"
            if row_tokens < args.max_tokens_per_row else "")
    lines = ["=" * 78, f"base model      {args.checkpoint}", f"precision       {rt.precision}",
             f"processes       {d.world} on {d.device.type}" + (" (DDP)" if d.enabled else ""),
             f"packing         {row}", f"cuda graphs     {rt.graphs_text}",
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
    dist.print0("\n".join(lines))


def warn_changed_recipe(resume: Path, saved_args: dict, args, world: int) -> None:
    now = safe_args(args)
    changed = [f"--{k} {saved_args[k]!r} -> {now.get(k)!r}" for k in RECIPE_FLAGS
               if k in saved_args and saved_args[k] != now.get(k)]
    if (was := C.saved_world(resume, world)) != world:
        changed.append(f"processes {was} -> {world}")
    if changed:
        dist.print0(f"warning: resuming {resume} with a changed recipe ({', '.join(changed)}); the result will "
                    "differ from an uninterrupted run")


# --- evaluation -------------------------------------------------------------------------------------------

def evaluate(predictor: "predict.Predictor", split: D.Split, labels, max_tokens: int, d: "dist.Dist") -> dict:
    """Each rank predicts a disjoint shard; confusion matrices are summed over ranks (counts, not means)."""
    idx, P = predictor.probs(split.input_ids, predictor.batches(split.lengths, d.rank, d.world, max_tokens))
    if not len(idx):  # a rank with no text of its own (fewer texts than processes)
        P = torch.zeros(0, len(labels))
    if not bool(torch.isfinite(P).all()):
        raise UserError(f"{split.path}: the model gives non-finite probabilities; its weights or the base model "
                        "hold NaN/inf values")
    cm = torch.from_numpy(metrics.confusion(split.labels[idx], P.argmax(-1).numpy(), len(labels))).to(torch.int64)
    cm = dist.all_reduce_sum(cm.to(d.device), d).cpu().numpy()  # every rank
    return metrics.metrics_from_confusion(cm, labels)


# --- the loop ---------------------------------------------------------------------------------------------

@dataclass
class LoopState:
    """What the loop carries from step to step, saved in every checkpoint (plain numbers only)."""
    global_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    nonfinite_run: int = 0
    early_stopping: dict | None = None  # lft.early_stopping.EarlyStopping.state_dict()


class MetricsLog:
    """metrics.jsonl: one JSON line per log step and per evaluation (rank 0 writes; the others do nothing)."""

    def __init__(self, out: Path, d: "dist.Dist", resumed_step: int):
        self.out, self.file = out, None
        if d.main:  # records after the resumed step were written by the interrupted run: they are redone
            outdir.truncate_log(out / "metrics.jsonl", resumed_step)
            self.file = (out / "metrics.jsonl").open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.file:
            with outdir.writing("metrics.jsonl", self.out):
                self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


class Trainer:
    """The recipe's objects, made once by setup(); fit() runs the loop; finish() evaluates on test, merges."""

    def __init__(self, **parts):
        self.__dict__.update(parts)

    @classmethod
    def setup(cls, args, d: "dist.Dist", reading: "D.ReadInBackground | None" = None) -> "Trainer":
        """Check everything that can be wrong before writing anything, cheapest first: the base model's files,
        the output folder, the checkpoint to resume, every data row; then the model on the device (and one
        worst-case step on a GPU) and the disk space for its checkpoints; only then tokenise. Large data files
        are read in a process of their own meanwhile (read_data; main starts it before torch is imported); the
        layers' training graph compiles in a thread while the weights move to the device (warm_compile), the
        tokenizer loads meanwhile, and the texts are tokenised during the compile."""
        t_start, times = time.perf_counter(), {}
        cache_before = R.compile_cache_counts()  # the process's counts: a second run in one process has its own
        labels = parse_labels(args.labels)
        out = Path(args.output_dir)
        with reading or read_data(args, labels) as reading:  # an error below ends the reading process
            rt = R.resolve(args, d.device, d.world, training=True)
            base.check_folder(args.checkpoint)  # reads only headers (seconds)
            outdir.check_output_dir(out, resuming=bool(args.resume_from_checkpoint))
            resume = C.find_checkpoint(args.resume_from_checkpoint, out)  # the newest that verifies
            saved = None
            if resume is not None:
                saved = C.check_resume(resume, labels, args.pooling, lora_spec(args))
                warn_changed_recipe(resume, saved.get("args", {}), args, d.world)
            splits = load_data(reading)
        rt, note = R.for_job(rt, args, estimated_tokens(splits, args, d.world), "training")
        if note:
            dist.print0(f"note: {note}")
        R.start_compile_workers(rt)  # they come up while the model loads
        warming = warm_compile(args, rt)  # the layers' graph compiles meanwhile, in a thread
        torch.manual_seed(args.seed)  # same head init on every rank
        t = time.perf_counter()
        times["data"] = t - t_start
        with explain_oom("the base model alone does not fit on this GPU: use --bf16 or a smaller Qwen3"):
            model, identity, tokenizer = qcd.build_classifier(
                args.checkpoint, labels, args.dropout, args.pooling, rt.weight_dtype, rt.attn, lora=lora_spec(args),
                device=d.device, with_tokenizer=True)
        if saved is not None:  # before anything is written: a checkpoint of another base must not mix with this one
            base.check_same_base(saved["base"], identity, resume)
        times["load"], t = time.perf_counter() - t, time.perf_counter()
        t_tok = t

        def tokenise():
            warnings = tokenize_data(splits, tokenizer, args, d, show=False)  # no bar beside the loading lines
            return warnings, time.perf_counter() - t_tok
        tokenising = Background(tokenise)  # a text that tokenises to nothing still stops the run before it writes
        if rt.compile:
            if warming is not None:
                try:
                    warming.result()
                except Exception as e:  # noqa: BLE001 - the model's own compile below meets (and reports) it
                    first = (str(e).splitlines() or [""])[0][:200]
                    dist.print0(f"note: compiling ahead failed ({type(e).__name__}: {first}); the model compiles "
                                "itself")
            qcd.compile_decoder_layers(model)
        probe = memory_probe(model, args, rt, tokenizer.pad_token_id)  # on a GPU its forward compiles the layers
        row_tokens = plan_memory(probe, args, rt, d)
        if rt.step_graphs and row_tokens < args.max_tokens_per_row:  # a card the wanted rows do not fit
            rt, note = R.for_capped_rows(rt, args)
            if note:
                dist.print0(f"note: {note}")
            if rt.step_graphs:  # --cuda_graphs on: the pool sized once for the widest row
                row_tokens = min(dist.gather_objects(reserve_graph_pool(  # every process splits its rows alike
                    model, args, rt, row_tokens, tokenizer.pad_token_id, M.budget(rt.device)), d))
        times["compile"], t = time.perf_counter() - t, time.perf_counter()
        cached, compiled = (now - before for now, before in zip(R.compile_cache_counts(), cache_before))
        graphs = f" ({compiled} graphs compiled, {cached} from the compile cache)" if cached or compiled else ""
        outdir.check_free_space(out, qcd.count_parameters(model)[1], args.save_total_limit)
        warnings, times["tokenise"] = tokenising.result()
        times["waited"] = time.perf_counter() - t
        for line in warnings:
            dist.print0(f"warning: {line}")
        setup_s = time.perf_counter() - t_start
        # run as a script, the clock users see (interpreter start-up and imports included); called from Python,
        # the process's age says nothing of this run
        launched = seconds_since_launch() if __name__ == "__main__" else None
        before = f"start-up {launched - setup_s:.1f} s, " if launched is not None else ""
        dist.print0(f"ready in {launched if launched is not None else setup_s:.1f} s ({before}checks and data "
                    f"{times['data']:.1f} s, load {times['load']:.1f} s, compile and memory probe "
                    f"{times['compile']:.1f} s{graphs}, tokenise {times['tokenise']:.1f} s beside the compile: "
                    f"{times['waited']:.1f} s after)")
        t = cls(args=args, d=d, rt=rt, labels=labels, out=out, splits=splits, tokenizer=tokenizer, model=model,
                identity=identity, resume=resume, row_tokens=row_tokens)
        t._plan_and_build()
        return t

    def epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        """The optimizer steps of an epoch, each a list of micro-batches (lists of text indices); the same on
        every rank, from (seed, epoch) alone."""
        a = self.args
        batches = D.length_grouped_batches(self.splits["train"].lengths, a.batch_size, a.seed, epoch,
                                           a.group_by_length)
        return D.training_steps(batches, a.gradient_accumulation_steps, self.d.world)

    def _plan_and_build(self) -> None:
        a, d = self.args, self.d
        plan = self.epoch_plan(0)  # every epoch has as many steps and micro-batches
        self.steps_per_epoch = len(plan)
        if self.steps_per_epoch == 0:
            raise UserError(f"--train_data {a.train_data}: {len(self.splits['train'])} texts are fewer than one "
                            f"micro-batch per process ({d.world} processes); lower --batch_size")
        self.total_steps = self.steps_per_epoch * a.num_epochs
        left_out = math.ceil(len(self.splits["train"]) / a.batch_size) - sum(map(len, plan))
        if left_out:  # every rank must run the same number of backward passes
            dist.print0(f"warning: {left_out} micro-batch(es) of up to {a.batch_size} texts per epoch are left "
                        f"out: the last optimizer step's micro-batches are cut to a multiple of the {d.world} "
                        "processes")
        if d.main:
            with outdir.writing("args.json", self.out):
                self.out.mkdir(parents=True, exist_ok=True)
                for line in outdir.clean_stale(self.out):
                    dist.print0(f"note: {line}")
                for stale in ("test_results.json",):  # from an earlier run's best_model: rewritten or absent
                    if (self.out / stale).is_file():
                        (self.out / stale).unlink()
                        dist.print0(f"note: removed {stale} of an earlier run in {self.out} (this run writes "
                                    "its own)")
                write_json(self.out / "args.json", safe_args(a))  # never a password, whatever the arguments hold
        banner(a, self.splits, self.labels, self.steps_per_epoch, self.total_steps, d, self.rt,
               qcd.count_parameters(self.model), self.tokenizer, self.row_tokens)
        for line in describe_sources(a, getattr(a, "_sources", {})):
            dist.print0(line)
        self.optimizer, self.scheduler, self.scaler = make_optimizer(self.model, a, self.rt, self.total_steps)
        self.class_w = class_weights(a, self.splits["train"], len(self.labels))
        self.meta = {"labels": list(self.labels), "id2label": dict(enumerate(self.labels)),
                     "max_length": a.max_length, "base": self.identity, "args": safe_args(a), "metrics": None}
        self.state = LoopState()
        self.stopper = EarlyStopping(a.early_stopping_patience, a.early_stopping_threshold)
        if self.resume is not None:
            self.state = LoopState(**C.load_checkpoint(self.resume, self.model, self.identity, self.optimizer,
                                                       self.scheduler, self.scaler, d))
            if self.state.early_stopping is not None:
                try:
                    self.stopper.load_state_dict(self.state.early_stopping)
                except ValueError as e:
                    raise UserError(f"{self.resume}: bad early-stopping state ({e}); it was not written by this "
                                    "toolkit") from None
            self._carry_best_model()
            dist.print0(f"resumed from {self.resume} at step {self.state.global_step}")
        else:
            torch.manual_seed(a.seed + d.rank)  # dropout masks differ per rank
        ddp = self.model
        if d.enabled:
            ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self.model.train()
        self.predictor = predict.Predictor(self.model, self.rt, self.tokenizer.pad_token_id, a.max_length)
        self.stepper = train_step.Stepper(self.model, ddp, self.rt, self.optimizer, self.scheduler, self.scaler,
                                          a.max_grad_norm, d.world, self.tokenizer.pad_token_id, a.max_length)

    def _carry_best_model(self) -> None:
        """Resuming into another --output_dir: bring the best_model that the checkpoint's best metric refers to,
        or forget that metric, so that this folder's best_model always exists and is the one reported."""
        st, out = self.state, self.out
        if st.best_step is None or (out / "best_model").is_dir():
            return
        theirs = self.resume.parent / "best_model"
        try:
            same = adapter.read_classifier_config(theirs)["metrics"]["step"] == st.best_step
        except (UserError, KeyError, TypeError):
            same = False
        if same and self.d.main:
            with outdir.writing("best_model", out):
                shutil.copytree(theirs, out / "best_model")
            dist.print0(f"note: copied {theirs} (best val macro-F1 {st.best_metric:.4f} at step {st.best_step}) "
                        f"to {out}")
        elif not same:
            dist.print0(f"note: {theirs} is not the best_model of step {st.best_step}; the next evaluation sets "
                        "best_model")
            st.best_metric, st.best_step = None, None
        dist.barrier(self.d)

    def fit(self, stop: StopRequest) -> int:
        """The loop: every optimizer step of every epoch (skipping those done before a resume), logging,
        evaluating and saving on their schedules. Returns 0, or 143/130 when stopped by a signal."""
        from tqdm.auto import tqdm

        a, st = self.args, self.state
        self.log = MetricsLog(self.out, self.d, st.global_step)
        self.tracker = Tracker.open(a.report_to, self.out, a.run_name, safe_args(a), self.d.main,
                                    resume_step=st.global_step if self.resume is not None else None)
        bar = tqdm(total=self.total_steps, initial=st.global_step, desc="train", unit="step",
                   disable=not self.d.main or a.no_progress, dynamic_ncols=True)
        self.flags, self.window = train_step.LaggedFlags(self.d.device), Window(self.d.device)
        stop_now = False
        stop.listen()  # from here SIGTERM/Ctrl-C finish the step, save a checkpoint and exit
        try:
            for epoch in range(st.global_step // self.steps_per_epoch, a.num_epochs):
                if self.stopper.should_stop:  # stopped early before this run resumed
                    break
                for i, step in enumerate(self.epoch_plan(epoch)):
                    if epoch * self.steps_per_epoch + i < st.global_step:
                        continue  # already done before the resume
                    stop_now = self.train_step(step, stop)
                    bar.update(1)
                    self.after_step(bar, stop_now)
                    if stop_now or self.stopper.should_stop:
                        break
                if stop_now or self.stopper.should_stop:
                    break
            self.read_flags(*self.flags.flush())  # the last step's flags, on CUDA
        finally:
            stop.release()
            bar.close()
            self.log.close()
            self.tracker.close()
        if stop_now:
            dist.print0(f"stopped by {stop.name} at step {st.global_step}/{self.total_steps}; checkpoint saved. Resume "
                   "with the same command plus --resume_from_checkpoint auto")
            return 128 + (stop.signum or signal.SIGTERM)  # 143 (SIGTERM) / 130 (Ctrl-C): "not done"
        dist.print0(f"training done: best val macro-F1 {st.best_metric:.4f} at step {st.best_step}; "
               f"adapter in {self.out / 'best_model'}")
        return 0

    def train_step(self, step: list[list[int]], stop: StopRequest) -> bool:
        """One optimizer step over `step` (all ranks' micro-batches; this rank takes its share). True when a
        stop was requested (read one step late on CUDA)."""
        a, d, train = self.args, self.d, self.splits["train"]
        micro = step[d.rank::d.world]
        if self.rt.packing:
            micro = D.merge_for_packing(micro, train.lengths, a.max_tokens_per_row)
            if self.row_tokens < a.max_tokens_per_row:  # the memory plan's cap (lft/memory.py)
                micro = D.split_rows(micro, train.lengths, self.row_tokens)
        # loss = sum over the step's texts / their count (or weight sum): every rank knows the whole step, so
        # the normaliser is exact
        idx_all = [j for mb in step for j in mb]
        norm = float(self.class_w[train.labels[idx_all]].sum()) if self.class_w is not None else float(len(idx_all))
        step_loss = torch.zeros((), device=d.device)
        for k, mb in enumerate(micro):
            y = torch.as_tensor(train.labels[mb])
            w = (self.class_w[y] if self.class_w is not None else torch.ones(len(mb))) / norm
            seqs = [train.input_ids[j] for j in mb]
            step_loss += self.stepper.micro_step(seqs, y, w, last=k == len(micro) - 1)
            self.window.add(len(mb), sum(map(len, seqs)))
        grad_norm, flags = self.stepper.optimizer_step(step_loss, stop.signum is not None)
        self.window.add_step(step_loss, grad_norm)
        self.state.global_step += 1
        host = self.read_flags(*self.flags.push(self.state.global_step, dist.all_reduce_sum(flags, d)))  # every rank
        return host is not None and host[2] > 0

    def read_flags(self, step: int | None, host: list | None) -> list | None:
        """Count consecutive non-finite steps; too many stop the run with best_model intact."""
        if host is None:
            return None
        st = self.state
        st.nonfinite_run = st.nonfinite_run + 1 if host[0] > 0 or host[1] > 0 else 0
        if st.nonfinite_run >= self.args.max_nonfinite_steps:
            kept = f"best_model (step {st.best_step}) is intact" if st.best_step else "no best_model"
            fix = "lower --learning_rate" + (", or use --bf16 instead of --fp16" if self.rt.use_scaler else "")
            raise UserError(f"{st.nonfinite_run} consecutive steps with a non-finite loss (the last at step {step}); "
                            f"{fix} ({kept}; --max_nonfinite_steps sets the limit)")
        return host

    def after_step(self, bar, stop_now: bool) -> None:
        a, gs = self.args, self.state.global_step
        if gs % a.logging_steps == 0 or gs == self.total_steps:
            self.log_window(bar)
        if gs % a.eval_steps == 0 or gs == self.total_steps:
            self.run_eval(gs)
        if gs % a.save_steps == 0 or gs == self.total_steps or stop_now or self.stopper.should_stop:
            self.state.early_stopping = self.stopper.state_dict()
            C.save_checkpoint(self.out / f"checkpoint-{gs}", self.model, self.meta, self.optimizer, self.scheduler,
                              self.scaler, asdict(self.state), self.d)
            if self.d.main:
                C.rotate_checkpoints(self.out, a.save_total_limit)
            self.window.restart_clock()  # eval/save time is not training throughput

    def log_window(self, bar) -> None:
        gs, d = self.state.global_step, self.d
        w = self.window.read(d)  # every rank
        lr = self.scheduler.get_last_lr()[0]
        line = (f"step {gs}/{self.total_steps} | epoch {gs / self.steps_per_epoch:.2f} | loss {w['loss']:.4f} | "
                f"lr {lr:.2e} | grad_norm {w['grad_norm']:.3f} | {w['ms_per_step']:.0f} ms/step | "
                f"{w['samples_per_s']:.1f} samples/s | {w['tokens_per_s']:.0f} tokens/s")
        mem = peak_memory(d.device)
        if mem:  # reserved is what nvidia-smi shows for this process (plus the CUDA context)
            line += f" | peak GiB {mem['peak_alloc_gib']:.1f} alloc / {mem['peak_reserved_gib']:.1f} reserved"
        if d.main:
            bar.write(line) if not self.args.no_progress else print(line, flush=True)
        record = {"step": gs, "epoch": gs / self.steps_per_epoch, "loss": w["loss"], "lr": lr,
                  "grad_norm": w["grad_norm"], "ms_per_step": w["ms_per_step"], "samples_per_s": w["samples_per_s"],
                  "tokens_per_s": w["tokens_per_s"], **mem}
        self.log.write(record)
        self.tracker.log(gs, {"train": {k: v for k, v in record.items() if k != "step"}})

    def run_eval(self, step: int) -> None:
        st, t0 = self.state, time.perf_counter()
        m = evaluate(self.predictor, self.splits["val"], self.labels, self.args.eval_batch_size * self.args.max_length,
                     self.d)
        seconds = time.perf_counter() - t0
        improved = st.best_metric is None or m["macro_f1"] > st.best_metric
        dist.print0(f"eval step {step} | val accuracy {m['accuracy']:.4f} | val macro-F1 {m['macro_f1']:.4f}"
               + (" | new best" if improved else f" | best {st.best_metric:.4f} at {st.best_step}")
               + f" | {seconds:.1f} s")
        self.log.write({"step": step, "split": "val", **{k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1")},
                        "seconds": seconds})
        self.tracker.log(step, {"val": {k: v for k, v in m.items() if k not in ("labels", "confusion_matrix")},
                                "val_seconds": seconds})
        decision = self.stopper.update(m["macro_f1"], step)  # the metric is all-reduced: every rank agrees
        if decision.stop:
            dist.print0(decision.reason)
        if improved:
            st.best_metric, st.best_step = m["macro_f1"], step
            if self.d.main:
                with outdir.writing("best_model", self.out):  # atomic: the previous best survives a failed write
                    adapter.save_adapter(self.model, self.out / "best_model",
                                         {**self.meta, "metrics": {"val": m, "step": step}})
        dist.barrier(self.d)

    def finish(self) -> int:
        """Evaluate best_model on --test_data (test_results.json) and export it merged (--merge)."""
        a, d = self.args, self.d
        if not (a.test_data or a.merge):
            return 0
        best, tok, best_meta = adapter.load_classifier(a.checkpoint, self.out / "best_model", self.rt.weight_dtype,
                                                       self.rt.attn, d.device)
        if a.test_data:
            predictor = predict.Predictor(best, self.rt, tok.pad_token_id, a.max_length)
            m = evaluate(predictor, self.splits["test"], self.labels, a.eval_batch_size * a.max_length, d)
            dist.print0("test results (best_model):\n" + metrics.format_report(m))
            if d.main:
                write_json(self.out / "test_results.json", {"model": redact(self.out / "best_model"),
                                                            "test_data": redact(a.test_data),
                                                            "best_step": self.state.best_step, **m})
        if a.merge and d.main:
            dtype = adapter.base_dtype(a.checkpoint) if a.merge_dtype == "auto" else getattr(torch, a.merge_dtype)
            adapter.export_merged(best, tok, self.out / "best_model_merged", best_meta, dtype)
            dist.print0(f"merged model ({str(dtype)[6:]}) in {self.out / 'best_model_merged'}")
        return 0


def peak_memory(device) -> dict:
    """Peak GPU memory of this process so far: allocated (tensors) and reserved (the caching allocator's pools,
    CUDA graph pools included: what nvidia-smi shows, less the CUDA context). Empty on CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


class Window:
    """Loss, gradient norm and throughput since the last log line: summed on the device, read when logged."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.steps, self.samples, self.tokens, self.t0 = 0, 0, 0, time.perf_counter()
        self.loss.zero_()
        self.grad_norm = None

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def add(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.loss += loss
        self.grad_norm = grad_norm
        self.steps += 1

    def read(self, d: "dist.Dist") -> dict:
        """Every rank (the loss is all-reduced)."""
        steps = max(self.steps, 1)
        loss = float(dist.all_reduce_sum(self.loss, d)) / steps
        dt = time.perf_counter() - self.t0
        out = {"loss": loss, "grad_norm": float(self.grad_norm) if self.grad_norm is not None else 0.0,
               "ms_per_step": 1000 * dt / steps, "samples_per_s": self.samples * d.world / dt,
               "tokens_per_s": self.tokens * d.world / dt}
        self.reset()
        return out


def main(argv=None) -> int:
    args = parse_args(argv)
    reading = read_data(args, parse_labels(args.labels))  # large files: read while torch and the model load
    try:
        d = dist.setup_distributed(args.device)
    except BaseException:
        reading.cancel()
        raise
    try:
        with explain_oom(OOM_FIX), StopRequest() as stop:
            t = Trainer.setup(args, d, reading)
            status = t.fit(stop)
            if status:
                return status
            with announce_signals(f"stopped after training; best_model is complete in {t.out / 'best_model'}. "
                                  "Evaluate it with test_saved_lora.py (and export it with --merge) separately"):
                return t.finish()
    finally:
        dist.cleanup()


if __name__ == "__main__":
    exit_script(main)
