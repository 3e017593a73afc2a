"""Inspect a Qwen3 checkpoint (and optionally a trained adapter) before training or deploying.

    python load_model.py --checkpoint /path/to/Qwen3-1.7B
    python load_model.py --checkpoint /path/to/Qwen3-1.7B --lora_model ./lora_model/best_model
    python load_model.py --checkpoint /path/to/Qwen3-1.7B --lora_r 16 --print_model

Prints the architecture (layers, hidden size, heads / KV heads, vocabulary, tied embeddings, dtype),
parameter counts with and without LoRA, where LoRA attaches, the head's shape and, for an adapter, its
labels, training arguments and the metrics it was chosen by.
"""
from __future__ import annotations

import argparse
import json

from lft.common import ArgumentParser, HelpFormatter, UserError, display_width, exit_script, lazy_import
from lft.labels import parse_labels

torch = lazy_import("torch")  # loaded on first use: --help answers at once
qcd = lazy_import("qwen3_classification_direct")
adapter = lazy_import("lft.adapter")
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default=None, help="local Qwen3 folder (not needed for a merged model)")
    p.add_argument("--lora_model", default=None, help="adapter (best_model/) or merged folder to inspect")
    p.add_argument("--labels", default=None, help="label names for a fresh head (default: the six safety labels)")
    p.add_argument("--pooling", choices=("last", "mean"), default="last")
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--lora_target_modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype to load the base in")
    p.add_argument("--print_model", action="store_true", help="also print the full module tree")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.lora_model:
        raise UserError("give --checkpoint (a Qwen3 folder) and/or --lora_model")
    if args.lora_r < 1:
        raise UserError("--lora_r must be >= 1")
    return args


def describe(model, title: str) -> list[str]:
    total, trainable = qcd.count_parameters(model)
    return [f"{title:<28} {total:>15,} parameters, {trainable:>12,} trainable ({100 * trainable / total:.3f}%)"]


def _chunks(text: str, width: int):
    """`text` in pieces of at most `width` terminal columns (CJK characters take two)."""
    piece = ""
    for ch in text:
        if piece and display_width(piece + ch) > width:
            yield piece
            piece = ""
        piece += ch
    yield piece


def args_table(args: dict, width: int = 72, max_lines: int = 3, indent: str = "  ") -> list[str]:
    """The training arguments as two columns, name and value; a long value wraps onto at most `max_lines` lines
    of `width` columns, and what is left is cut with '...' (args.json holds it whole)."""
    if not args:
        return [f"{indent}(none recorded)"]
    w = max(len(k) for k in args)
    lines = []
    for name, value in args.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        parts = list(_chunks(text, width))
        if len(parts) > max_lines:
            parts = parts[:max_lines]
            parts[-1] = next(_chunks(parts[-1], width - 3)) + "..."
        lines += [f"{indent}{name if i == 0 else '':<{w}}  {part}" for i, part in enumerate(parts)]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    meta = None
    if args.lora_model:
        model, _, meta = adapter.load_classifier(args.checkpoint, args.lora_model, dtype)
        for n, p in model.named_parameters():  # what training trains: LoRA and the head
            p.requires_grad_("lora_" in n or n.startswith("score."))
    else:
        labels = parse_labels(args.labels)
        model, _ = qcd.build_classifier(args.checkpoint, labels, 0.0, args.pooling, dtype)
    backbone = model.base_model
    cfg = backbone.config
    emb = backbone.get_input_embeddings().weight
    lines = [f"model folder                 {args.checkpoint or args.lora_model}",
             f"architecture                 Qwen3: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
             f"intermediate {cfg.intermediate_size}",
             f"attention                    {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} KV heads, "
             f"head dim {getattr(cfg, 'head_dim', cfg.hidden_size // cfg.num_attention_heads)}",
             f"vocabulary                   {cfg.vocab_size:,} embedding rows ({tuple(emb.shape)})",
             f"tied embeddings (checkpoint) {getattr(cfg, 'tie_word_embeddings', None)} "
             "- the classifier builds no LM head, so nothing is tied to its head",
             f"weights dtype                {emb.dtype}",
             f"max positions                {cfg.max_position_embeddings:,}"]
    head = model.score.weight
    lines.append(f"classification head          score: Linear({head.shape[1]} -> {head.shape[0]}, no bias), "
                 f"pooling '{model.pooling}'")
    if meta is None:
        backbone.requires_grad_(False)  # what training freezes
        lines += describe(model, "without LoRA (head only)")
        targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
        qcd.add_lora(model, args.lora_r, args.lora_alpha, 0.0, targets)
        lines += describe(model, f"with LoRA r={args.lora_r}")
    else:
        lines += describe(model, "with the adapter")
    attached = sorted({n.rsplit(".lora_A", 1)[0].split("layers.")[-1].split(".", 1)[-1]
                       for n, _ in model.named_parameters() if ".lora_A" in n})
    lora_layers = len({n.split("layers.")[1].split(".")[0] for n, _ in model.named_parameters() if ".lora_A" in n})
    lines.append(f"LoRA attaches to             {', '.join(attached)} in {lora_layers} of {cfg.num_hidden_layers} layers")
    if meta is not None:
        lines.append(f"labels                       {', '.join(f'{i}={n}' for i, n in enumerate(meta['labels']))}")
        lines.append(f"trained on base              {meta['base']['name']} ({meta['base']['path']})")
        lines.append(f"max_length                   {meta['max_length']}")
        if meta.get("metrics"):
            v = meta["metrics"]["val"]
            lines.append(f"chosen at step               {meta['metrics']['step']}: val macro-F1 {v['macro_f1']:.4f}, "
                         f"accuracy {v['accuracy']:.4f}")
        lines.append("training arguments")
        lines += args_table(meta.get("args") or {})
    print("\n".join(lines))
    if args.print_model:
        print(model)
    return 0


if __name__ == "__main__":
    exit_script(main)
