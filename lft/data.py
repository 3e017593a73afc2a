"""Data: the label set, loading and validating a split, tokenising once, and batching.

Batches are lists of sample indices; `collate_padded` and `collate_packed` turn one into tensors. The
training plan is computed identically on every rank from (seed, epoch), so no sampler state needs to be
communicated or saved: resuming only needs the step number.
"""
from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .common import UserError
from .tables import read_table

# The original project's label set and order: id -> name. Adapters store their own copy (id2label).
DEFAULT_LABELS = ("正常", "歧视", "违法违规", "政治安全", "暴恐", "色情低俗")


def clean_label(value) -> str:
    """Full-width -> half-width and stray whitespace removed (NFKC), so ' 暴恐 ' and '４' are recognised."""
    return unicodedata.normalize("NFKC", str(value)).strip()


def parse_labels(spec: str | None) -> tuple[str, ...]:
    if not spec:
        return DEFAULT_LABELS
    names = tuple(clean_label(x) for x in spec.split(",") if clean_label(x))
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError(f"--labels: need at least two distinct comma-separated names, got {spec!r}")
    return names


def _row_name(path: Path, i: int) -> int:
    """The row number a user sees for 0-based data row i: spreadsheet/csv rows count the header line."""
    return i + 2 if path.suffix.lower() in (".xlsx", ".csv") else i + 1


def _rows(path: Path, idx, limit: int = 8) -> str:
    idx = list(idx)
    shown = ", ".join(str(_row_name(path, i)) for i in idx[:limit])
    return shown + (f" and {len(idx) - limit} more" if len(idx) > limit else "")


@dataclass
class Split:
    path: Path
    texts: list[str]
    labels: np.ndarray  # int64 label ids
    input_ids: list[list[int]] = field(default_factory=list)
    n_truncated: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def load_split(path, labels=DEFAULT_LABELS, text_column="text_cn", label_column="extracted_label",
               require_labels: bool = True) -> Split:
    """Read one data file and validate every row; each problem names the file, the rows and the fix."""
    path = Path(path)
    df = read_table(path)
    if len(df) == 0:
        raise UserError(f"{path}: no data rows")
    need = [text_column] + ([label_column] if require_labels else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, df.columns))} "
                        f"(use --text_column/--label_column)")

    raw_texts = df[text_column].tolist()
    bad = [i for i, t in enumerate(raw_texts) if t is None or (isinstance(t, float) and math.isnan(t))
           or not str(t).strip()]
    if bad:
        raise UserError(f"{path}: empty {text_column} in {len(bad)} row(s): {_rows(path, bad)}; "
                        "fill or delete those rows")
    texts = [str(t) for t in raw_texts]

    if not require_labels:
        return Split(path, texts, np.full(len(texts), -1, dtype=np.int64))
    by_name = {name: i for i, name in enumerate(labels)}
    ids, unknown = np.empty(len(df), dtype=np.int64), {}
    for i, value in enumerate(df[label_column].tolist()):
        key = "" if value is None or (isinstance(value, float) and math.isnan(value)) else clean_label(value)
        if key.endswith(".0") and key[:-2].isdigit():  # Excel stores 3 as 3.0
            key = key[:-2]
        if key in by_name:
            ids[i] = by_name[key]
        elif key.isdigit() and int(key) < len(labels):
            ids[i] = int(key)
        else:
            unknown.setdefault(key or "(empty)", []).append(i)
    if unknown:
        parts = "; ".join(f"{value!r} in row(s) {_rows(path, rows)}" for value, rows in unknown.items())
        raise UserError(f"{path}: unknown {label_column} value(s): {parts}. "
                        f"Known: {', '.join(f'{i}={n}' for i, n in enumerate(labels))}")
    return Split(path, texts, ids)


def tokenize_split(split: Split, tokenizer, max_length: int, desc: str = "tokenise", show: bool = True) -> None:
    """Tokenise every text once, up front. No special tokens are added (Qwen3 has no BOS); texts longer than
    max_length keep their first max_length tokens and are counted in split.n_truncated."""
    from tqdm.auto import tqdm

    out, chunk = [], 2048
    for start in tqdm(range(0, len(split.texts), chunk), desc=desc, unit="chunk", disable=not show, leave=False):
        enc = tokenizer(split.texts[start:start + chunk], add_special_tokens=False)["input_ids"]
        out.extend(enc)
    split.n_truncated = sum(len(x) > max_length for x in out)
    split.input_ids = [x[:max_length] if len(x) > max_length else x for x in out]
    empty = [i for i, x in enumerate(split.input_ids) if not x]
    if empty:
        raise UserError(f"{split.path}: {len(empty)} text(s) tokenise to nothing: rows {_rows(split.path, empty)}")


# --- batching ---------------------------------------------------------------------------------------------

def length_grouped_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                           group_by_length: bool = True, mega: int = 64) -> list[list[int]]:
    """Shuffle, then sort by length inside windows of `mega` batches, so each batch holds similar lengths
    (little padding) while the order stays random. The longest batch goes first: an out-of-memory error
    shows in the first step, not hours in. Same (seed, epoch) -> same batches on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        window = batch_size * mega
        perm = [i for s in range(0, len(perm), window)
                for i in sorted(perm[s:s + window], key=lambda j: -lengths[j])]
    batches = [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]
    if group_by_length and len(batches) > 1:
        longest = max(range(len(batches)), key=lambda b: max(lengths[j] for j in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
        rest = torch.randperm(len(batches) - 1, generator=g).tolist()
        batches = [batches[0]] + [batches[1 + r] for r in rest]
    return batches


def training_steps(batches: list[list[int]], accum: int, world: int) -> list[list[list[int]]]:
    """Group micro-batches into optimizer steps of world*accum micro-batches. A short last step is cut to a
    multiple of `world` (every rank must run the same number of backward passes); rank r takes step[r::world]."""
    per_step = accum * world
    steps = []
    for s in range(0, len(batches), per_step):
        step = batches[s:s + per_step]
        step = step[: len(step) - len(step) % world]
        if step:
            steps.append(step)
    return steps


def eval_batches(lengths: np.ndarray, rank: int = 0, world: int = 1, max_tokens: int = 0,
                 batch_size: int = 32) -> list[list[int]]:
    """This rank's evaluation batches: every sample exactly once over all ranks (no padding duplicates),
    sorted by length so batches are dense; bounded by `max_tokens` padded tokens if given, else batch_size."""
    mine = [i for i in range(len(lengths)) if i % world == rank]
    mine.sort(key=lambda i: -lengths[i])
    batches, cur = [], []
    for i in mine:
        width = max([lengths[i]] + [lengths[j] for j in cur[:1]])  # sorted descending: first is longest
        if cur and ((max_tokens and width * (len(cur) + 1) > max_tokens) or (not max_tokens and len(cur) >= batch_size)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def collate_padded(seqs: list[list[int]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch (never to max_length)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if padding_side == "right":
            ids[r, :len(s)] = torch.as_tensor(s)
            mask[r, :len(s)] = 1
        else:
            ids[r, width - len(s):] = torch.as_tensor(s)
            mask[r, width - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def collate_packed(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Concatenate a batch into one row with no padding. Position ids restart at 0 for every sample (that is
    how the attention layers see the sample borders); cu_seqlens[k] is where sample k starts."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long).unsqueeze(0)
    pos = torch.cat([torch.arange(n, dtype=torch.long) for n in lens.tolist()]).unsqueeze(0)
    # max_len is a host int: flash attention needs it, and reading it off a device tensor would sync
    return {"input_ids": ids, "position_ids": pos, "cu_seqlens": cu, "max_len": int(lens.max())}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def merge_for_packing(micro_batches: list[list[int]], lengths, max_tokens: int) -> list[list[int]]:
    """With packing, a rank's accumulation micro-batches become as few rows as fit `max_tokens`: the loss is a
    sum over the step's texts either way, so the gradient is the same, with fewer, larger kernels."""
    rows, cur, cur_tokens = [], [], 0
    for mb in micro_batches:
        n = int(sum(lengths[i] for i in mb))
        if cur and cur_tokens + n > max_tokens:
            rows.append(cur)
            cur, cur_tokens = [], 0
        cur = cur + list(mb)
        cur_tokens += n
    if cur:
        rows.append(cur)
    return rows
