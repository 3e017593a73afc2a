"""Evaluate a saved adapter (or merged model) on a labelled table.

    python test_saved_lora.py --checkpoint /path/to/Qwen3-1.7B --lora_model ./lora_model/best_model \
        --test_data test_data.xlsx --batch_size 18 --max_length 256
    python test_saved_lora.py --lora_model ./lora_model/best_model_merged --test_data test_data.xlsx
    torchrun --nproc_per_node=4 test_saved_lora.py ...same flags...
    python test_saved_lora.py ...same flags... --quantize fp8      # fp8 base projections (GPU, cc >= 8.9)

Prints accuracy, macro/weighted precision/recall/F1, per-class scores and the confusion matrix, and writes
to --output_dir (default: <lora_model>_eval beside the model folder, so copying the model folder to deploy
it carries no evaluation files): test_results.json, confusion_matrix.png and predictions
(text, gold, predicted, one probability column per label) as .xlsx (or --predictions_format).
test_results.json is written first, so a problem with the other files never loses the results.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lft import runtime as R
from lft.common import (ArgumentParser, Background, HelpFormatter, UserError, exit_script, explain_oom, lazy_import,
                        redact, write_json)
from lft.quantize import add_quantize_arg, check_quantize, describe, int8_note, load_dtype, quantize_model

# torch and everything built on it load on first use: --help and flag errors answer at once
np, torch = lazy_import("numpy"), lazy_import("torch")
adapter, D, dist, metrics, outdir, predict = (lazy_import(f"lft.{m}") for m in (
    "adapter", "data", "dist", "metrics", "outdir", "predict"))


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default=None, help="base Qwen3 folder (default: the base the adapter recorded; "
                   "not needed for a merged model)")
    p.add_argument("--lora_model", required=True, help="adapter folder (best_model/) or merged folder")
    p.add_argument("--test_data", required=True, help="table with text and label columns")
    p.add_argument("--text_column", default="text_cn")
    p.add_argument("--label_column", default="extracted_label")
    p.add_argument("--batch_size", type=int, default=18, help="texts per batch (bounds tokens per batch)")
    p.add_argument("--max_length", type=int, default=None, help="default: the adapter's training max_length")
    p.add_argument("--output_dir", default=None, help="default: <lora_model>_eval, beside the model folder")
    p.add_argument("--predictions_format", choices=("xlsx", "csv", "jsonl", "parquet"), default="xlsx")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    R.add_runtime_args(p)
    add_quantize_arg(p)
    args = p.parse_args(argv)
    problems = []
    if args.batch_size < 1:
        problems.append("--batch_size must be >= 1")
    if args.max_length is not None and args.max_length < 2:
        problems.append("--max_length must be >= 2")
    R.check_runtime_args(args, problems)
    check_quantize(args, args.device, problems)
    if not Path(args.test_data).is_file():
        problems.append(f"--test_data {args.test_data}: file not found")
    if not Path(args.lora_model).is_dir():
        problems.append(f"--lora_model {args.lora_model}: not a folder")
    if problems:
        raise UserError("; ".join(problems))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    d = dist.setup_distributed(args.device)
    try:
        with explain_oom("lower --batch_size or --max_length"):
            return run(args, d)
    finally:
        dist.cleanup()


def run(args, d) -> int:
    import qwen3_classification_direct as qcd

    rt = R.resolve(args, d.device, d.world, training=False)
    model_dir = Path(args.lora_model).resolve()
    out = Path(args.output_dir) if args.output_dir else model_dir.with_name(model_dir.name + "_eval")
    # cheap checks first: the adapter's label list against every data row, the output folder, the base weights
    labels = adapter.read_classifier_config(args.lora_model)["labels"]
    split = D.load_split(args.test_data, labels, args.text_column, args.label_column,
                         labels_from=f"the adapter {Path(args.lora_model) / 'classifier_config.json'}")
    outdir.check_output_dir(out, resuming=True)
    model, tokenizer, meta = adapter.load_classifier(args.checkpoint, args.lora_model, load_dtype(args.quantize, rt),
                                                     rt.attn, d.device)
    quantize_model(model, args.quantize, rt)  # on the device, before compiling
    max_length = args.max_length or meta["max_length"]
    D.tokenize_split(split, tokenizer, max_length, show=d.main and not args.no_progress)
    for line in split.notes:
        dist.print0(f"warning: {line}")
    rt, note = R.for_job(rt, args, int(split.lengths.sum()) // d.world, "evaluation")  # this rank's share
    for line in (note, int8_note(args.quantize, rt.device)):
        if line:
            dist.print0(f"note: {line}")
    if rt.compile:
        qcd.compile_decoder_layers(model)
    dist.print0(f"model {args.lora_model} ({len(labels)} labels, pooling {meta['pooling']}, {rt.precision}, "
                f"{describe(args.quantize)}); "
                f"{len(split)} texts from {args.test_data}, {split.n_truncated} cut to {max_length} tokens")

    # the reports' imports (scikit-learn, matplotlib, openpyxl: ~1.5 s) run while the evaluation waits on the GPU,
    # started when the main thread has done its own imports (none shared: no module is imported by two threads at once)
    predictor = predict.Predictor(model, rt, tokenizer.pad_token_id, max_length, args.quantize)
    reports = Background(lambda: metrics.warm_up(args.predictions_format)) if d.main else None
    try:
        probs = predictor.probs(split.input_ids, predictor.batches(split.lengths, d.rank, d.world,
                                                                   max_tokens=args.batch_size * max_length))
        parts = dist.gather_objects(probs, d)  # every rank; each text was predicted by exactly one rank
    finally:  # an error exits only after the imports end: a thread cut off mid-import can crash the exit
        if reports is not None:
            # join, not result(): a failed warm-up is no error here; the import fails again where a report needs
            # it, after test_results.json is written, as it would without the warm-up
            reports.join()
    if not d.main:
        return 0
    P = predict.in_order(parts, len(split))
    if not np.isfinite(P).all():
        raise UserError(f"--lora_model {args.lora_model}: the model gives non-finite probabilities; its weights or "
                        "the base model hold NaN/inf values")
    pred = P.argmax(1)
    m = metrics.metrics_from_confusion(metrics.confusion(split.labels, pred, len(labels)), labels)
    print(metrics.format_report(m))
    write_outputs(args, out, split, labels, P, pred, m, max_length)
    return 0


def write_outputs(args, out: Path, split, labels, P, pred, m: dict, max_length: int) -> None:
    """test_results.json first (the numbers), then the PNG and the predictions table."""
    import pandas as pd

    from lft.tables import write_table

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "test_results.json", {"model": redact(args.lora_model), "test_data": redact(args.test_data),
                                           "max_length": max_length, "quantize": args.quantize, **m})
    metrics.plot_confusion(m, out / "confusion_matrix.png")
    table = pd.DataFrame({"text": split.texts, "gold": [labels[i] for i in split.labels],
                          "predicted": [labels[i] for i in pred], "correct": pred == split.labels})
    for j, name in enumerate(labels):
        table[f"p_{name}"] = P[:, j].round(6)
    write_table(table, out / f"predictions.{args.predictions_format}")
    print(f"wrote {out / 'test_results.json'}, {out / 'confusion_matrix.png'}, "
          f"{out / ('predictions.' + args.predictions_format)}")


if __name__ == "__main__":
    exit_script(main)
