"""Data: the label set, loading and validating a split, tokenising once, and batching.

Batches are lists of sample indices; `collate_padded` and `collate_packed` turn one into tensors. The
training plan is computed identically on every rank from (seed, epoch), so no sampler state needs to be
communicated or saved: resuming only needs the step number.
"""
from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import UserError, gc_paused, lazy_import
from .tables import is_missing, read_table_rows

from .labels import DEFAULT_LABELS, clean_label, parse_labels  # noqa: F401  (re-exported)

# torch loads on first use: read_splits runs in a process of its own that never needs it (ReadInBackground)
torch = lazy_import("torch")


def _row_name(path: Path, i: int, lines=None) -> int:
    """The row number a user sees for 0-based data row i: the file's line (csv, jsonl) or sheet row (xlsx), as
    read_table_rows found it (blank lines and multi-line texts counted); without it, header + i."""
    if lines is not None:
        return int(lines[i])
    return i + 2 if path.suffix.lower() in (".xlsx", ".csv") else i + 1


def _rows(path: Path, idx, limit: int = 8, lines=None) -> str:
    idx = list(idx)
    shown = ", ".join(str(_row_name(path, i, lines)) for i in idx[:limit])
    return shown + (f" and {len(idx) - limit} more" if len(idx) > limit else "")


@dataclass
class Split:
    path: Path
    texts: list[str]
    labels: np.ndarray  # int64 label ids
    input_ids: list[list[int]] = field(default_factory=list)
    n_truncated: int = 0
    rows: np.ndarray | None = None  # each text's 0-based data row in the file (kept through --dedup)
    notes: list[str] = field(default_factory=list)  # warnings for the log: the run is right, but look
    lines: list[int] | None = None  # the file line / sheet row of each data row (indexed like `rows`' values)

    def __post_init__(self):
        if self.rows is None:
            self.rows = np.arange(len(self.texts))

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, idx) -> str:
        """The file rows of texts `idx`, as a user finds them (header line counted)."""
        return _rows(self.path, [int(self.rows[i]) for i in idx], lines=self.lines)

    def subset(self, keep) -> "Split":
        keep = list(keep)
        return Split(self.path, [self.texts[i] for i in keep], self.labels[keep],
                     [self.input_ids[i] for i in keep] if self.input_ids else [], 0, self.rows[keep], self.notes,
                     self.lines)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def _missing_columns(path: Path, df, missing: list[str]) -> str:
    """The error for absent columns, with the near misses and, for a workbook, its other sheets."""
    import difflib

    found = [str(c) for c in df.columns]
    folded = {clean_label(c).casefold(): c for c in found}
    hints = []
    for c in missing:
        near = folded.get(clean_label(c).casefold()) or next(iter(difflib.get_close_matches(c, found, 1, 0.6)), None)
        if near is not None:
            hints.append(f"{c!r} looks like {near!r}")
    msg = f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(found) or '(none)'}"
    if hints:
        msg += f" ({'; '.join(hints)}: rename the header or pass --text_column/--label_column)"
    else:
        msg += " (use --text_column/--label_column)"
    if path.suffix.lower() == ".xlsx":
        from .tables import sheet_names

        sheets = sheet_names(path)
        if len(sheets) > 1:
            msg += f"; only the first sheet ({sheets[0]!r}) is read, the workbook also has " \
                   f"{', '.join(map(repr, sheets[1:]))}: move the data to the first sheet"
    return msg


def _is_missing(value) -> bool:
    """None, NaN, pd.NA, NaT: never the text "<NA>" or "NaT"."""
    return is_missing(value)


def _is_blank(value) -> bool:
    """No visible character: empty, missing, or only spaces, control and format characters (U+200B zero-width
    space, U+200C/D joiners, U+FEFF, U+0001 ...), which a tokenizer would turn into a text the user never saw."""
    return _is_missing(value) or all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp")
                                     for c in str(value))


def _as_text(value) -> str:
    """A cell as text; a number Excel stored as a float (3.0) reads as "3"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@gc_paused()  # builds ~10 objects per row: cyclic collections walking torch's objects cost ~1/3 of the read
def load_split(path, labels=DEFAULT_LABELS, text_column="text_cn", label_column="extracted_label",
               require_labels: bool = True, labels_from: str = "--labels") -> Split:
    """Read one data file and validate every row; each problem names the file, the rows and the fix.

    Errors (the run could not be right): no rows, a missing column, an empty or NaN text, an unknown label.
    Notes (the run is right, but look): texts stored as numbers, label ids mixed with label names."""
    path = Path(path)
    df, lines = read_table_rows(path)

    def where(idx) -> str:  # rows as a user finds them: the file's own line numbers (blank lines counted)
        return _rows(path, idx, lines=lines)

    if len(df) == 0:
        raise UserError(f"{path}: no data rows (only a header, or an empty sheet)")
    need = [text_column] + ([label_column] if require_labels else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise UserError(_missing_columns(path, df, missing))

    raw_texts = df[text_column].tolist()
    bad = [i for i, t in enumerate(raw_texts) if _is_blank(t)]
    if bad:
        invisible = [raw_texts[i] for i in bad if not _is_missing(raw_texts[i]) and str(raw_texts[i]).strip()]
        hint = (f" ({len(invisible)} of them hold only invisible characters, e.g. {invisible[0]!r})"
                if invisible else "")
        raise UserError(f"{path}: empty {text_column} in {len(bad)} row(s): {where(bad)}; "
                        f"fill or delete those rows{hint}")
    texts = [_as_text(t) for t in raw_texts]
    notes = []
    numeric = [i for i, t in enumerate(raw_texts) if not isinstance(t, str)]
    if numeric:
        notes.append(f"{path}: {len(numeric)} {text_column} value(s) are numbers or dates, not text (rows "
                     f"{where(numeric)}); they are used as written, e.g. {texts[numeric[0]]!r}")

    if not require_labels:
        return Split(path, texts, np.full(len(texts), -1, dtype=np.int64), notes=notes, lines=lines)
    by_name = {name: i for i, name in enumerate(labels)}
    ids, unknown, as_id, as_name = np.empty(len(df), dtype=np.int64), {}, [], []
    for i, value in enumerate(df[label_column].tolist()):
        key = "" if _is_missing(value) else clean_label(_as_text(value))
        if key.endswith(".0") and key[:-2].isdigit():  # "3.0" typed as text
            key = key[:-2]
        if key in by_name:
            ids[i] = by_name[key]
            as_name.append(i)
        elif key.isascii() and key.isdigit() and int(key) < len(labels):  # ASCII only: int("²") would fail
            ids[i] = int(key)
            as_id.append(i)
        else:
            unknown.setdefault(key or "(empty)", []).append(i)
    if unknown:
        parts = "; ".join(f"{value!r} in row(s) {where(rows)}" for value, rows in unknown.items())
        raise UserError(f"{path}: unknown {label_column} value(s): {parts}. "
                        f"Known (from {labels_from}): {', '.join(f'{i}={n}' for i, n in enumerate(labels))}; "
                        "fix those rows or the label list")
    if as_id and as_name:
        notes.append(f"{path}: {label_column} mixes label ids ({len(as_id)} rows, e.g. row {where(as_id[:1])}) "
                     f"and names ({len(as_name)} rows); ids are read in {labels_from} order: "
                     f"{', '.join(f'{i}={n}' for i, n in enumerate(labels))}")
    return Split(path, texts, ids, notes=notes, lines=lines)


def _text_key(text: str) -> str:
    """What makes two texts the same for duplicate checks: NFKC form, surrounding whitespace ignored."""
    return unicodedata.normalize("NFKC", text).strip()


def check_splits(splits: dict[str, Split], labels, dedup: bool = False) -> tuple[dict[str, Split], list[str]]:
    """Duplicates inside a split, texts shared between splits, labels the training set lacks.

    Without `dedup` these are reported (with counts and rows) and nothing changes. With `dedup`: train keeps
    the first of each repeated text and drops texts that are also in val or test; val likewise keeps its
    first copies and drops texts that are also in test; test is never changed (it is the benchmark). A split
    that ends up empty is an error. Returns the (possibly reduced) splits and the lines to print."""
    notes = []
    keys = {name: [_text_key(t) for t in s.texts] for name, s in splits.items()}
    later = {"train": ("val", "test"), "val": ("test",), "test": ()}
    out = {}
    for name, s in splits.items():
        first, dup, conflict = {}, [], []
        for i, k in enumerate(keys[name]):
            if k in first:
                dup.append(i)
                if s.labels[first[k]] != s.labels[i]:
                    conflict.append(i)
            else:
                first[k] = i
        shared = {}
        for other in later[name]:
            if other in splits:
                theirs = set(keys[other])
                shared[other] = [i for i, k in enumerate(keys[name]) if k in theirs]
        if dup:
            clash = f", {len(conflict)} of them with a different label (rows {s.where(conflict)})" if conflict else ""
            notes.append(f"{s.path}: {len(dup)} repeated text(s) in {name} (rows {s.where(dup)}){clash}; "
                         + ("removed (--dedup)" if dedup and name != "test" else
                            "kept" + ("" if name == "test" else " (--dedup removes them)")))
        for other, idx in shared.items():
            if idx:
                notes.append(f"{s.path}: {len(idx)} {name} text(s) also in {other} ({splits[other].path}), rows "
                             f"{s.where(idx)}; {other} scores are optimistic"
                             + (f"; removed from {name} (--dedup)" if dedup else " (--dedup removes them)"))
        if dedup and name != "test":
            drop = set(dup).union(*map(set, shared.values()))
            s = s.subset(i for i in range(len(s)) if i not in drop)
            if len(s) == 0:
                raise UserError(f"{s.path}: no {name} rows left after --dedup (all are repeats or in "
                                f"{'/'.join(later[name])}); fix the split or run without --dedup")
        out[name] = s
    if "train" in out:
        have = set(out["train"].labels.tolist())
        for name in ("val", "test"):
            if name in out:
                miss = sorted(set(out[name].labels.tolist()) - have)
                if miss:
                    n = int(np.isin(out[name].labels, miss).sum())
                    notes.append(f"{out[name].path}: label(s) {', '.join(labels[i] for i in miss)} ({n} {name} "
                                 f"rows) never occur in train ({out['train'].path}); the model cannot learn them")
    return out, notes


def read_splits(paths: dict[str, str], labels, text_column: str, label_column: str,
                dedup: bool = False) -> tuple[dict[str, Split], list[str]]:
    """Every split read and checked (load_split each, then check_splits across them), and the warnings to print:
    each split's notes, then the notes across splits."""
    return checked_splits({name: load_split(path, labels, text_column, label_column) for name, path in paths.items()},
                          labels, dedup)


def checked_splits(splits: dict[str, Split], labels, dedup: bool) -> tuple[dict[str, Split], list[str]]:
    """check_splits across the splits, and the warnings to print: each split's notes, then the notes across them."""
    splits, notes = check_splits(splits, labels, dedup)
    return splits, [n for s in splits.values() for n in s.notes] + notes


READ_PROCESS_BYTES = 4 << 20  # data files together at least this big are read by ReadInBackground's process


class ReadInBackground:
    """read_splits(...) with every file read in a process of its own, started now, where the files together hold
    at least READ_PROCESS_BYTES; result() waits for them and checks the splits against each other. Parsing and
    checking every row is Python work that holds the GIL (the original recipe's 63,000 texts: 2.3 s under cProfile
    on an H200 host, run 38), so a thread could not overlap it; processes run it while the caller imports torch,
    starts CUDA and loads the model, each file beside the others.

    Each process is a fresh interpreter (`python -c`, not multiprocessing: nothing of a parent that may hold CUDA
    or threads is inherited, and no caller's __main__ is run again); it imports this module, which loads no torch,
    so it is up in a fraction of a second. Smaller files are read in result(), in this process: there a second
    interpreter would cost more than it saves. The calls and the answers travel as JSON (through a pipe and an
    unnamed temporary file): nothing is unpickled. A UserError in a process is raised by result() as the same
    UserError (the first file's in the order given, as reading them in turn would); cancel(), or leaving a `with`
    block, ends the processes."""

    def __init__(self, paths: dict[str, str], labels, text_column: str, label_column: str, dedup: bool = False,
                 min_bytes: int | None = None):
        self._paths = {name: str(p) for name, p in paths.items()}
        self._labels, self._columns, self._dedup = list(labels), (text_column, label_column), dedup
        self._procs = {}  # split name -> (process, its answer file)
        size = sum(Path(p).stat().st_size for p in paths.values() if Path(p).is_file())
        if size >= (READ_PROCESS_BYTES if min_bytes is None else min_bytes):
            import json
            import subprocess
            import sys
            import tempfile

            root = str(Path(__file__).resolve().parent.parent)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
            for name, path in self._paths.items():
                out = tempfile.TemporaryFile()  # the answer: a pipe would fill up and stall the reader
                proc = subprocess.Popen([sys.executable, "-c", "from lft.data import _read_split_child as f; f()"],
                                        stdin=subprocess.PIPE, stdout=out, env=env)
                self._procs[name] = (proc, out)
                try:
                    proc.stdin.write(json.dumps([path, self._labels, *self._columns]).encode())
                    proc.stdin.close()
                except BrokenPipeError:  # the process died at start; result() reports its exit status
                    pass

    @property
    def in_process(self) -> bool:
        return bool(self._procs)

    def result(self) -> tuple[dict[str, Split], list[str]]:
        if not self._procs:
            return read_splits(self._paths, self._labels, *self._columns, self._dedup)
        import json

        answers = {}
        try:
            for name, (proc, out) in self._procs.items():
                rc = proc.wait()
                out.seek(0)
                answers[name] = (rc, out.read())
        finally:
            self.cancel()
        splits = {}
        for name, (rc, data) in answers.items():  # errors in the order of the files, as read_splits meets them
            if rc != 0 or not data:
                raise RuntimeError(f"reading the data in a second process failed (exit status {rc}); its error is "
                                   "above")
            answer = json.loads(data)
            if "user_error" in answer:
                raise UserError(answer["user_error"])
            if "error" in answer:
                raise RuntimeError(f"reading the data in a second process failed: {answer['error']}")
            splits[name] = _split_from_json(answer["split"])
        return checked_splits(splits, self._labels, self._dedup)

    def cancel(self) -> None:
        for proc, out in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
        self._procs = {}

    def __enter__(self) -> "ReadInBackground":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


def _read_split_child() -> None:
    """ReadInBackground's process: load_split's call as JSON from stdin, the split (or the error) as JSON to
    stdout."""
    import json
    import sys

    try:
        answer = {"split": _split_to_json(load_split(*json.loads(sys.stdin.buffer.read())))}
    except UserError as e:
        answer = {"user_error": str(e)}
    except Exception as e:  # noqa: BLE001 - raised again in the parent by result()
        answer = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.buffer.write(json.dumps(answer).encode())  # ASCII escapes: a lone surrogate in a text survives
    sys.stdout.flush()


def _split_to_json(s: Split) -> dict:
    return {"path": str(s.path), "texts": s.texts, "labels": s.labels.tolist(), "rows": s.rows.tolist(),
            "notes": s.notes, "lines": None if s.lines is None else [int(x) for x in s.lines]}


def _split_from_json(d: dict) -> Split:
    return Split(Path(d["path"]), d["texts"], np.asarray(d["labels"], dtype=np.int64),
                 rows=np.asarray(d["rows"], dtype=np.int64), notes=d["notes"], lines=d["lines"])


def encode_texts(tokenizer, texts: list[str], threads: int = 1, chunk: int = 2048, progress=None) -> list[list[int]]:
    """Every token id of each text, no special tokens added, none cut. The `tokenizers` backend encodes directly
    (the tokenizer's call gives the same ids), unless something set truncation or padding on it, which the
    tokenizer's call leaves out. With `threads` > 1, chunks of texts encode in that many threads:
    the backend releases the GIL, so they run in parallel whatever TOKENIZERS_PARALLELISM says (63,000 texts of
    the original recipe: 6.2 s in one thread on a 2-core machine). `progress(n)` is called after each chunk.
    Safe to call from several threads: it never changes the tokenizer."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets computed

        def encode(part):
            return [e.ids for e in encode_batch(part, add_special_tokens=False)]
    else:
        def encode(part):
            return tokenizer(part, add_special_tokens=False)["input_ids"]
    parts = [list(texts[s:s + chunk]) for s in range(0, len(texts), chunk)]
    out = []
    if threads <= 1 or len(parts) == 1:
        for part in parts:
            out.extend(encode(part))
            if progress:
                progress(len(part))
        return out
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(parts)), thread_name_prefix="tokenise") as pool:
        for part, ids in zip(parts, pool.map(encode, parts)):
            out.extend(ids)
            if progress:
                progress(len(part))
    return out


def tokenize_threads() -> int:
    """Threads for tokenising a data set: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def tokenize_split(split: Split, tokenizer, max_length: int, desc: str = "tokenise", show: bool = True,
                   threads: int | None = None) -> None:
    """Tokenise every text once, up front. No special tokens are added (Qwen3 has no BOS); texts longer than
    max_length keep their first max_length tokens and are counted in split.n_truncated."""
    from tqdm.auto import tqdm

    with tqdm(total=len(split.texts), desc=desc, unit="text", disable=not show, leave=False) as bar:
        out = encode_texts(tokenizer, split.texts, threads or tokenize_threads(), progress=bar.update)
    cut = [i for i, x in enumerate(out) if len(x) > max_length]
    split.n_truncated = len(cut)
    split.input_ids = [x[:max_length] if len(x) > max_length else x for x in out]
    if cut:
        longest = max(len(out[i]) for i in cut)
        split.notes.append(f"{split.path}: {len(cut)} text(s) longer than {max_length} tokens (up to {longest}) "
                           f"keep their first {max_length}: rows {split.where(cut)}; raise --max_length to keep more")
    empty = [i for i, x in enumerate(split.input_ids) if not x]
    if empty:
        raise UserError(f"{split.path}: {len(empty)} text(s) tokenise to nothing: rows {split.where(empty)}; "
                        "fill or delete those rows")


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
                 batch_size: int = 32, packed: bool = False) -> list[list[int]]:
    """This rank's evaluation batches: every sample exactly once over all ranks (no padding duplicates),
    sorted by length so batches are dense; bounded by `max_tokens` padded tokens if given (real tokens if
    `packed`: rows of one length whatever the texts', which CUDA graphs replay), else by batch_size."""
    mine = [i for i in range(len(lengths)) if i % world == rank]
    mine.sort(key=lambda i: -lengths[i])
    batches, cur, real = [], [], 0
    for i in mine:
        width = max([lengths[i]] + [lengths[j] for j in cur[:1]])  # sorted descending: first is longest
        need = real + lengths[i] if packed else width * (len(cur) + 1)
        if cur and ((max_tokens and need > max_tokens) or (not max_tokens and len(cur) >= batch_size)):
            batches.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += int(lengths[i])
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


def collate_packed_static(seqs: list[list[int]], width: int, slots: int, max_len: int, pad_id: int
                          ) -> dict[str, torch.Tensor]:
    """`collate_packed` laid out in a fixed shape, so one CUDA graph serves every row of that shape: the row is
    `width` tokens (real tokens, then padding cut into segments of at most `max_len`, each its own sample that
    nothing pools), and cu_seqlens has `slots` + 1 entries (after the real and padding samples come empty
    ones, repeating the row's end). Sample k's logits are row k of the output for k < len(seqs); the rest are
    to be ignored. max_len is the fixed bound of every sample (the run's --max_length)."""
    lens = [len(s) for s in seqs]
    total = sum(lens)
    pad = width - total
    pad_lens = [min(max_len, pad - o) for o in range(0, pad, max_len)]
    if pad < 0 or len(seqs) + len(pad_lens) > slots or max(lens, default=0) > max_len:
        raise ValueError(f"{len(seqs)} texts of {total} tokens do not fit {width} tokens / {slots} slots")
    cu = torch.full((slots + 1,), width, dtype=torch.int32)
    cu[0] = 0
    cu[1:len(lens) + len(pad_lens) + 1] = torch.cumsum(torch.tensor(lens + pad_lens, dtype=torch.int32), 0)
    ids = torch.full((1, width), pad_id, dtype=torch.long)
    ids[0, :total] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    pos = torch.cat([torch.arange(n, dtype=torch.long) for n in lens + pad_lens]).unsqueeze(0)
    return {"input_ids": ids, "position_ids": pos, "cu_seqlens": cu, "max_len": max_len}


# fixed-shape row widths: training rows (one micro-batch each) in steps of 128 tokens (~2% padding at the
# training defaults); evaluation rows are filled up to a real-token budget, so steps of 512 make nearly all of
# them one shape (one CUDA graph)
TRAIN_ROW_STEP, EVAL_ROW_STEP = 128, 512
SMALL_ROW_TOKENS = 2048  # evaluation rows up to this many tokens come in widths of TRAIN_ROW_STEP (eval_shape)


def static_shape(n_texts: int, n_tokens: int, max_len: int, step: int = TRAIN_ROW_STEP) -> tuple[int, int]:
    """(width, slots) of the fixed-shape row that holds n_texts texts of n_tokens tokens: the width rounds up to
    a multiple of `step` (~2% padding at the training defaults), the slots to a power of two >= 64."""
    width = max(step, -(-n_tokens // step) * step)
    return width, _slots(n_texts, n_tokens, width, max_len)


def _slots(n_texts: int, n_tokens: int, width: int, max_len: int) -> int:
    """Samples of a fixed-shape row: its texts plus the padding's segments of <= max_len, as a power of two >= 64."""
    need = n_texts + -(-(width - n_tokens) // max_len)
    return max(64, 1 << (need - 1).bit_length())


def eval_shape(n_texts: int, n_tokens: int, max_len: int, cap: int | None = None) -> tuple[int, int]:
    """(width, slots) of an evaluation row. Rows of up to SMALL_ROW_TOKENS (one request, say) come in widths of
    TRAIN_ROW_STEP: little padding compute. Larger rows come in few shapes, so a long job captures a handful of
    CUDA graphs and runs few rows eagerly: widths in quarter octaves, 2048, 2560, 3072, 3584, 4096, 5120, ... (at
    most a fifth padding; from 2,048 to 4,096 tokens the steps of 512 of smaller rows' EVAL_ROW_STEP), never past
    `cap` (the rows' token budget, rounded up to EVAL_ROW_STEP), so every full row of a long job has the one width
    `cap`.
    Slots are a power of two over the texts and, for a full row, at least width / 16: every full row of texts
    averaging 16 or more tokens then has the one count too (the unused slots are empty samples, next to free)."""
    if n_tokens <= SMALL_ROW_TOKENS:
        return static_shape(n_texts, n_tokens, max_len, TRAIN_ROW_STEP)
    width = SMALL_ROW_TOKENS
    while width < n_tokens:
        width += 1 << (width.bit_length() - 3)  # a quarter of the power of two at or below it
    full = False
    if cap:
        cap = -(-cap // EVAL_ROW_STEP) * EVAL_ROW_STEP
        if n_tokens <= cap and width >= cap:
            width, full = cap, True
    slots = _slots(n_texts, n_tokens, width, max_len)
    return width, max(slots, 1 << (width // 16 - 1).bit_length()) if full else slots


def to_device(batch: dict, device) -> dict:
    """Tensors to `device`; ints stay on the host. For CUDA they are pinned first: a copy from pageable memory
    waits for the GPU to drain its queue, which would stall the CPU once per micro-batch."""
    cuda = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if cuda else v).to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def split_rows(rows: list[list[int]], lengths, max_tokens: int) -> list[list[int]]:
    """Rows over `max_tokens` split between texts, in order (the memory plan's cap, lft/memory.py): the loss is
    a sum over the step's texts, so the gradient is the same. A text is never cut."""
    out = []
    for row in rows:
        cur, cur_tokens = [], 0
        for i in row:
            n = int(lengths[i])
            if cur and cur_tokens + n > max_tokens:
                out.append(cur)
                cur, cur_tokens = [], 0
            cur.append(i)
            cur_tokens += n
        if cur:
            out.append(cur)
    return out


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
