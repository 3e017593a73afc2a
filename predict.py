"""Label new texts with a trained classifier: a table in, the same table plus predictions out; or MongoDB in place.

    # a file (.xlsx, .csv, .jsonl or .parquet; the output has the input's format)
    python predict.py --lora_model lora_model/best_model --input new.csv --output new_labelled.csv
    python predict.py --lora_model best_model --checkpoint /models/Qwen3-1.7B --input posts.parquet \\
        --output posts_labelled.parquet --id_column post_id --threshold 暴恐:0.3,色情低俗:0.5
    # JSON lines on stdin -> the same objects plus the prediction fields on stdout
    cat posts.jsonl | python predict.py --lora_model best_model --input - --output - > labelled.jsonl
    # MongoDB in place: {label, score, probs, model, at} into each matching document's --write_field
    MONGO_PASSWORD=... python predict.py --lora_model best_model -u admin --auth-database scanadata \\
        --db scanadata --collection data_items --query '{"source": "feed-1"}' --write_field prediction

Output columns: the input's columns (an --id_column first), then `label`, `score` (its probability) and
`p_<label>` for every label, rows in the input's order. A row without text is an error listing the rows
(exit 2, nothing written) unless --skip_bad_rows, which writes it with an empty label. csv, jsonl and parquet
are read and written --chunk_size rows at a time (memory stays bounded on any number of rows); the output
appears only when complete (temp file + rename). In MongoDB mode documents that already hold a prediction of
this very model (`<write_field>.model` == the model's fingerprint) are skipped by the query, so a run that was
stopped continues where it stopped and a second run changes nothing; documents without a text are counted and
left untouched. The password comes from MONGO_PASSWORD or a prompt, never from the command line.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lft import mongo
from lft import runtime as R
from lft.common import (ArgumentParser, HelpFormatter, UserError, exit_script, explain_oom, lazy_import, print_table,
                        redact)
from lft.quantize import add_quantize_arg, check_quantize, int8_note
from lft.stream import STDIO, name_rows, open_sink, open_source

np = lazy_import("numpy")  # numpy, torch and the model load on first use: --help answers at once

CHUNK = 8192  # rows per read/classify/write step; documents per bulk write


def parse_args(argv=None) -> argparse.Namespace:
    head, usage = __doc__.split("\n\n", 1)
    p = ArgumentParser(description=head, epilog=usage, formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--lora_model", required=True, help="adapter folder (best_model/) or merged folder")
    g.add_argument("--checkpoint", default=None, help="base Qwen3 folder (default: the base the adapter recorded)")
    g.add_argument("--max_length", type=int, default=None, help="tokens kept per text (default: the adapter's)")
    g.add_argument("--max_tokens", type=int, default=None,
                   help="tokens per packed row or padded batch (default: 64 x max_length; --quantize int8 on the "
                        "CPU: at most 256, or max_length); lower it on OOM")
    g.add_argument("--threshold", default=None,
                   help='e.g. "暴恐:0.3,色情低俗:0.5": a text reaching a listed label\'s threshold gets that label '
                        "(the most probable such label), otherwise the most probable label")
    g = p.add_argument_group("files")
    g.add_argument("--input", default=None, help=".xlsx/.csv/.jsonl/.parquet, or - for JSON lines on stdin")
    g.add_argument("--output", default=None, help="same format as --input (- with --input -: stdout)")
    g.add_argument("--text_column", "--text_field", "--text-field", dest="text_column", default="text_cn",
                   help="column (file) or field (MongoDB, dotted path allowed) holding the text (default: text_cn)")
    g.add_argument("--id_column", default=None, help="a column of the input to write first in the output")
    g.add_argument("--skip_bad_rows", action="store_true",
                   help="rows without text get an empty label and are counted (default: error listing them)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    g.add_argument("--chunk_size", type=int, default=CHUNK,
                   help=f"rows read, labelled and written at a time; MongoDB: documents per bulk write "
                        f"(default: {CHUNK})")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    mongo.add_connection_args(p)
    g = p.add_argument_group("MongoDB write-back")
    g.add_argument("--query", default=None, help="a JSON object (MongoDB extended JSON) selecting the documents "
                                                 "(default: all)")
    g.add_argument("--write_field", "--write-field", default=None,
                   help="field that receives {label, score, probs, model, at}; giving it selects MongoDB mode")
    R.add_runtime_args(p)
    add_quantize_arg(p)
    args = p.parse_args(argv)
    check_args(args, p)
    return args


MONGO_ONLY = ("host", "port", "uri", "username", "auth_database", "query")
FILE_ONLY = ("input", "output", "id_column", "overwrite", "skip_bad_rows")


def check_args(args, p) -> None:
    """Every problem with the flags, at once, before anything is loaded."""
    problems = []
    flag = {a.dest: a.option_strings[-1] if a.option_strings[-1].startswith("--") else a.option_strings[0]
            for a in p._actions if a.option_strings}
    given = lambda names: [flag[n] for n in names if getattr(args, n) not in (None, False)]  # noqa: E731
    if args.write_field is not None:  # MongoDB mode
        if given(FILE_ONLY):
            problems.append(f"{', '.join(given(FILE_ONLY))} apply to files, not to MongoDB mode (--write_field)")
        problems += mongo.connection_problems(args)
        args.query_doc = parse_query(args.query, problems)
        wf, tf = args.write_field, args.text_column
        if not wf or wf.startswith("$") or wf == "_id" or ".." in wf or wf.endswith("."):
            problems.append(f"--write_field {wf!r}: give a field name such as prediction")
        elif wf == tf or tf.startswith(wf + ".") or wf.startswith(tf + "."):
            problems.append(f"--write_field {wf} would overwrite the text field {tf}")
    else:
        if given(MONGO_ONLY):
            problems.append(f"{', '.join(given(MONGO_ONLY))} apply to MongoDB mode: give --write_field too")
        if not args.input or not args.output:
            problems.append("give --input and --output (files, or - for JSON lines on stdin/stdout), or "
                            "--write_field and the MongoDB flags")
        else:
            check_files(args, problems)
    for name in ("max_length", "max_tokens", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "max_length" else 1):
            problems.append(f"--{name} must be >= {2 if name == 'max_length' else 1}")
    R.check_runtime_args(args, problems)
    check_quantize(args, args.device, problems)
    args.labels = args.adapter_max_length = None
    if not Path(args.lora_model).is_dir():
        problems.append(f"--lora_model {args.lora_model}: not a folder")
    else:
        from lft.adapter import read_classifier_config
        from lft.labels import parse_thresholds

        try:
            config = read_classifier_config(args.lora_model)
            args.labels, args.adapter_max_length = config["labels"], config["max_length"]
            args.thresholds = parse_thresholds(args.threshold, args.labels)
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError("; ".join(problems))


def check_files(args, problems: list[str]) -> None:
    from lft.tables import table_format

    i, o = args.input, args.output
    if (i == STDIO) != (o == STDIO):
        problems.append("- means JSON lines on stdin and stdout: give both --input - and --output -")
        return
    if i == STDIO:
        return
    for name, path in (("--input", i), ("--output", o)):
        try:
            table_format(path)
        except UserError as e:
            problems.append(f"{name} {e}")
            return
    if table_format(i) != table_format(o):
        problems.append(f"--output {o}: must have the input's format ({table_format(i)}) so every column keeps "
                        "its type")
    if not Path(i).is_file():
        problems.append(f"--input {i}: file not found")
    elif Path(o).exists() and Path(o).resolve() == Path(i).resolve():
        problems.append("--output must not be --input (the input would be lost if anything failed)")
    if Path(o).exists() and not args.overwrite and Path(o).resolve() != Path(i).resolve():
        problems.append(f"--output {o} exists; pass --overwrite to replace it")


def parse_query(text: str | None, problems: list[str]) -> dict:
    if text is None:
        return {}
    from bson import json_util

    try:
        query = json_util.loads(text)
    except Exception as e:  # json_util raises ValueError and bson errors alike
        problems.append(f"--query is not valid JSON ({str(e).splitlines()[0][:100]})")
        return {}
    if not isinstance(query, dict):
        problems.append(f"--query must be a JSON object such as '{{\"source\": \"feed-1\"}}', not a "
                        f"{type(query).__name__}")
        return {}
    return query


# --- labelling -----------------------------------------------------------------------------------------------

class Labeller:
    """Classifies lists of texts and keeps the counts the summary prints."""

    def __init__(self, clf, thresholds):
        self.clf, self.thresholds = clf, thresholds
        self.counts, self.tokens, self.texts, self.bad = Counter(), 0, 0, 0

    def __call__(self, texts: list[str], ids: list[list[int]] | None = None):
        """(probabilities (n, labels), chosen label ids). `ids`: the texts already tokenised (clf.encode)."""
        from lft.labels import choose_labels

        ids = self.clf.encode(texts) if ids is None else ids
        P = self.clf.proba_of_ids(ids)
        chosen = choose_labels(P, self.thresholds)
        self.tokens += sum(map(len, ids))
        self.texts += len(texts)
        self.counts.update(chosen.tolist())
        return P, chosen

    def summary(self, seconds: float, out, extra: list[list[str]] = ()) -> None:
        labels = self.clf.labels
        rows = [[name, f"{self.counts[i]:,}", f"{100 * self.counts[i] / max(self.texts, 1):.1f}%"]
                for i, name in enumerate(labels)]
        rows += [["total", f"{self.texts:,}", ""]] + list(extra)
        print_table(["label", "texts", "share"], rows, file=out)
        print(f"{self.texts:,} texts in {seconds:.1f} s: {self.texts / max(seconds, 1e-9):,.0f} texts/s, "
              f"{self.tokens / max(seconds, 1e-9):,.0f} tokens/s", file=out)


def progress(args, total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=" texts", disable=True if args.no_progress else None,
                file=sys.stderr, dynamic_ncols=True)


def load_classifier(args, out, job_tokens: int | None = None):
    """The classifier; `job_tokens` (files: from the scan) lets a small job skip compiling."""
    from lft.predict import Classifier

    t = time.perf_counter()
    clf = Classifier.load(args.lora_model, args.checkpoint, args=args, max_length=args.max_length,
                          max_tokens=args.max_tokens, quantize=args.quantize, job_tokens=job_tokens)
    for note in (clf.note, int8_note(args.quantize, clf.runtime.device)):
        if note:
            print(f"note: {note}", file=out)
    print(f"model {redact(args.lora_model)} ({len(clf.labels)} labels, fingerprint {clf.identity}, "
          f"{clf.runtime.precision}, quantize {args.quantize}, max_length {clf.max_length}, "
          f"{clf.max_tokens} tokens/row) loaded in "
          f"{time.perf_counter() - t:.1f} s" + (f" (compiling {clf.compile_seconds:.1f} s)" if clf.compile_seconds
                                              else ""), file=out)
    return clf


def columns_for(labels, P, chosen, keep: list[int], n: int) -> dict:
    """label, score, p_<label> for n rows; rows not in `keep` (no text) get None."""
    cols = {"label": [None] * n, "score": [None] * n, **{f"p_{name}": [None] * n for name in labels}}
    P = np.round(P.astype(np.float64), 6)
    for j, i in enumerate(keep):
        k = int(chosen[j])
        cols["label"][i] = labels[k]
        cols["score"][i] = float(P[j, k])
        for c, name in enumerate(labels):
            cols[f"p_{name}"][i] = float(P[j, c])
    return cols


def run_files(args) -> int:
    out = sys.stderr if args.output == STDIO else sys.stdout  # stdout may be the data
    src = open_source(args.input, args.text_column)
    if args.input != STDIO:  # stdin is read once, as it comes: a line without the text is a bad row
        src.check_columns([(args.text_column, "--text_column")] + ([(args.id_column, "--id_column")]
                                                                   if args.id_column else []))
    new = ["label", "score"] + [f"p_{name}" for name in args.labels]
    clash = [c for c in new if c in src.columns]
    if clash:
        raise UserError(f"{args.input}: already has column(s) {', '.join(clash)}, which the output adds; rename "
                        "them (or run on the original table)")
    if args.input != STDIO:  # the text column alone, before the model loads: every bad row at once
        total, (n_bad, first) = src.scan(args.chunk_size, cap=args.max_length or args.adapter_max_length)
        if total == 0:
            raise UserError(f"{args.input}: no data rows")
        if n_bad and not args.skip_bad_rows:
            raise UserError(f"{args.input}: empty or missing {args.text_column} in {n_bad} {src.unit}(s): "
                            f"{name_rows(first, n_bad)}; fill or delete them, or pass --skip_bad_rows")
    clf = load_classifier(args, out, src.chars)  # stdin: size unknown (None), the fast path
    lab = Labeller(clf, args.thresholds)
    t0 = time.perf_counter()
    def read_and_tokenise():  # runs in a thread, a chunk or two ahead of the model
        for chunk in src.chunks(args.chunk_size):
            keep = [i for i, t in enumerate(chunk.texts) if t is not None]
            yield chunk, keep, clf.encode([chunk.texts[i] for i in keep])

    with open_sink(args.output, src, args.id_column) as write, progress(args, src.total, "predict") as bar, \
            ThreadPoolExecutor(1) as writer:
        # three stages overlap: reading + tokenising (a thread), the model (here), writing (a thread); the
        # tokenizer and the GPU release the GIL, so the GPU is not left waiting on pandas or the disk
        written, clock = [], Clock()
        for chunk, keep, ids in clock.waiting(in_background(read_and_tokenise(), depth=2)):
            if len(keep) < len(chunk.texts):
                bad = [chunk.rows[i] for i in range(len(chunk.texts)) if chunk.texts[i] is None]
                if not args.skip_bad_rows:  # only stdin gets here: files were checked above
                    raise UserError(f"stdin: empty or missing {args.text_column} on line(s) "
                                    f"{name_rows(bad, len(bad))} (lines before this chunk were written); fix them "
                                    "or pass --skip_bad_rows")
                lab.bad += len(bad)
            with clock("model"):
                P, chosen = lab([chunk.texts[i] for i in keep], ids)
            written.append(writer.submit(write, chunk, columns_for(clf.labels, P, chosen, keep, len(chunk.texts))))
            while written and written[0].done():
                written.pop(0).result()  # a failed write stops the run here
            bar.update(len(chunk.texts))
        with clock("writer"):
            for w in written:
                w.result()
    seconds = time.perf_counter() - t0
    lab.summary(seconds, out, [["skipped (no text)", f"{lab.bad:,}", ""]] if args.skip_bad_rows else [])
    captures = f" (CUDA-graph captures {clf.predictor.capture_seconds:.1f} s)" if clf.runtime.eval_graphs else ""
    print(f"time: model {clock['model']:.1f} s{captures}, waiting for input {clock['input']:.1f} s, for the writer "
          f"{clock['writer']:.1f} s", file=out)
    if args.output != STDIO:
        print(f"wrote {lab.texts + lab.bad:,} rows to {args.output}", file=out)
    return 0


class Clock(dict):
    """Seconds per stage of the main thread (the summary's "time:" line says where a run's time went)."""

    def __missing__(self, key):
        return 0.0

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self[stage] += time.perf_counter() - t

    def waiting(self, items):
        """Iterate `items`, counting the time spent waiting for each as "input"."""
        it = iter(items)
        try:
            while True:
                with self("input"):
                    item = next(it, StopIteration)
                if item is StopIteration:
                    return
                yield item
        finally:
            getattr(it, "close", lambda: None)()  # stops in_background's thread at once on an error


def in_background(items, depth: int = 2):
    """Iterate `items` in a thread, `depth` items ahead of the consumer; an exception is raised here, in order."""
    import queue
    import threading

    q, stop, end = queue.Queue(maxsize=depth), threading.Event(), object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="read-tokenise")
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# --- MongoDB in place ----------------------------------------------------------------------------------------

def run_mongo(args) -> int:
    from datetime import datetime, timezone

    from pymongo import UpdateOne
    from pymongo.errors import PyMongoError

    from lft.adapter import fingerprint

    identity = fingerprint(args.lora_model)  # what the query skips: documents this very model labelled
    wf, tf = args.write_field, args.text_column
    base = args.query_doc
    todo = {"$and": [base, {f"{wf}.model": {"$ne": identity}}]} if base else {f"{wf}.model": {"$ne": identity}}
    done_q = {"$and": [base, {f"{wf}.model": identity}]} if base else {f"{wf}.model": identity}
    client = mongo.connect(args, mongo.read_password(args), appname="predict")
    lost = "documents labelled so far keep their prediction; run again to continue"
    try:
        coll = mongo.open_collection(client, args, [(tf, "--text_field")])
        done = coll.count_documents(done_q)
        total = coll.count_documents(todo)
        print(f"{args.db}.{args.collection} on {mongo.server_name(args)}: {total:,} document(s) to label, "
              f"{done:,} already labelled by this model ({identity})")
        clf = load_classifier(args, sys.stdout)
        lab = Labeller(clf, args.thresholds)
        bad_ids = []
        t0 = time.perf_counter()
        cursor = coll.find(todo, {"_id": 1, tf: 1}, batch_size=args.chunk_size).sort("_id", 1)
        with cursor, progress(args, total, "predict") as bar:
            for docs in batched(cursor, args.chunk_size):
                keep, texts = [], []
                for d in docs:
                    t = mongo.get_path(d, tf)
                    if isinstance(t, str) and t.strip():
                        keep.append(d["_id"])
                        texts.append(t)
                    else:
                        lab.bad += 1
                        if len(bad_ids) < 5:
                            bad_ids.append(d["_id"])
                if texts:
                    P, chosen = lab(texts)
                    P = np.round(P.astype(np.float64), 6)
                    at = datetime.now(timezone.utc)
                    ops = [UpdateOne({"_id": _id}, {"$set": {wf: {
                        "label": clf.labels[k], "score": float(p[k]),
                        "probs": {n: float(v) for n, v in zip(clf.labels, p)}, "model": identity, "at": at}}})
                        for _id, p, k in zip(keep, P, chosen.tolist())]
                    coll.bulk_write(ops, ordered=False)
                bar.update(len(docs))
    except PyMongoError as e:
        raise mongo.mongo_error(e, args, may="read and write", lost=lost) from None
    finally:
        client.close()
    seconds = time.perf_counter() - t0
    lab.summary(seconds, sys.stdout, [["already labelled", f"{done:,}", ""],
                                      ["no text (untouched)", f"{lab.bad:,}", ""]])
    print(f"classified {lab.texts:,}, already done {done:,}, bad {lab.bad:,}"
          + (f" (e.g. _id {', '.join(map(str, bad_ids))})" if bad_ids else ""))
    return 0


def batched(cursor, n: int):
    batch = []
    for doc in cursor:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv=None) -> int:
    args = parse_args(argv)
    with explain_oom("lower --max_tokens or --max_length"):
        return run_mongo(args) if args.write_field is not None else run_files(args)


if __name__ == "__main__":
    exit_script(main)
