"""Export a labelled training/validation/test table from a MongoDB collection, with a quota per label.

    # training set: a reproducible random sample, 15000 正常 and 6000 of each other label
    MONGO_PASSWORD=... python get_data_by_labels.py -u admin --auth-database scanadata \\
        -l "正常:15000,政治安全:6000,暴恐:6000,歧视:6000,色情低俗:6000,违法违规:6000" \\
        -f text_cn,n_labels --random --seed 123 -o balanced_train.xlsx
    # validation set from the same collection, sharing no text with the training set
    MONGO_PASSWORD=... python get_data_by_labels.py -u admin --auth-database scanadata \\
        -l "正常:3000,政治安全:3000,暴恐:3000,歧视:3000,色情低俗:3000,违法违规:3000" \\
        -f text_cn,n_labels --random --seed 456 --exclude-file balanced_train.xlsx -o val.xlsx
    # which labels exist, and how many documents carry each
    python get_data_by_labels.py -u admin --auth-database scanadata --list-labels
    # try it without a production database: a local MongoDB-wire server loaded with the demo data
    python tools/demo_mongo.py          # prints the exact export command to run against it

The password comes from the environment variable MONGO_PASSWORD, or else an interactive prompt; never
from the command line. The output (.xlsx, .csv, .jsonl or .parquet, by suffix) has the columns
`text_cn` and `extracted_label` (the quota label the row was chosen for) that train_lora.py reads, then
the fields asked for with -f. It is written atomically: on any error no output file is left behind.

How rows are chosen. Documents carrying a quota label are visited in one order -- by `_id` without
--random; with --random by rank = sha256("<seed>\\0<text>") (ties, i.e. equal texts, by a hash of `_id`)
-- and each goes to the first label of -l that it carries and whose quota is not yet full. A text that
is already in the export, or in an --exclude-file, is skipped, so no text appears twice and a document
with several quota labels is exported once. The rank depends only on the seed and the text, so the
same seed and the same data give the same rows in the same order on any server, and re-importing the
collection with new `_id`s keeps the same texts (only which copy of a repeated text is taken may change).
Only `_id`, the text and the label field are streamed, and only the best-ranked few per label are kept.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import heapq
import json
import random
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lft.common import ArgumentParser, UserError, exit_script, print_table
from lft.labels import DEFAULT_LABELS, clean_label
from lft.mongo import (add_connection_args, connect, connection_problems, get_path, mongo_error, open_collection,
                       read_password, server_name)
from lft.tables import EXCEL_MAX_ROWS, read_table, table_format, write_table

TEXT_COLUMN, LABEL_COLUMN = "text_cn", "extracted_label"  # what train_lora.py reads
SCAN_BATCH = 1000        # documents per getMore while streaming _id + text + labels
FETCH_CHUNK = 100        # _ids per `$in` when fetching the other fields: `$in` slows down with long lists


def parse_args(argv=None) -> argparse.Namespace:
    head, usage = __doc__.split("\n\n", 1)
    p = ArgumentParser(description=head, epilog=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = add_connection_args(p)
    g.add_argument("--label-field", default="n_labels",
                   help="field holding a document's label, a string or a list of strings (default: n_labels)")
    g.add_argument("--text-field", default="text_cn", help="field holding the text (default: text_cn)")
    g = p.add_argument_group("selection")
    g.add_argument("-l", "--labels", default=None, help='quotas, "label:count,label:count,..."')
    g.add_argument("--any-label", action="store_true",
                   help=f"allow quota labels outside the toolkit's label set ({', '.join(DEFAULT_LABELS)})")
    g.add_argument("--random", action="store_true", help="a random sample (reproducible with --seed) instead of "
                                                        "the first documents by _id")
    g.add_argument("--seed", type=int, default=None, help="seed of the random sample (default: chosen and printed)")
    g.add_argument("--strict", action="store_true", help="fail if a label has fewer documents than its quota "
                                                        "(default: warn and take all of them)")
    g.add_argument("--exclude-file", "--exclude", dest="exclude", action="extend", nargs="+", default=[],
                   metavar="FILE", help="earlier exports (column text_cn) whose texts must not be exported again")
    g = p.add_argument_group("output")
    g.add_argument("-f", "--fields", default="text_cn,n_labels",
                   help="comma-separated fields to export besides text_cn and extracted_label (default: "
                        "text_cn,n_labels); lists are written as 'a, b', sub-documents as JSON")
    g.add_argument("-o", "--output", default=None, help="output file: .xlsx, .csv, .jsonl or .parquet")
    g.add_argument("--list-labels", action="store_true", help="print every label value with its document count "
                                                             "and exit")
    return p.parse_args(argv)


def parse_quotas(spec: str, any_label: bool) -> tuple[dict[str, int], list[str]]:
    """'正常:15000,暴恐:6000' -> ({'正常': 15000, '暴恐': 6000}, problems). Full-width '：' and '，' are accepted."""
    quotas, problems = {}, []
    for item in unicodedata.normalize("NFKC", spec).split(","):
        if not item.strip():
            continue
        name, sep, count = item.partition(":")
        name, count = clean_label(name), count.strip()
        if not sep or not name:
            problems.append(f"-l/--labels: {item.strip()!r} is not label:count")
        elif not count.isdigit() or int(count) < 1:
            problems.append(f"-l/--labels: count for {name} must be a whole number >= 1, got {count!r}")
        elif name in quotas:
            problems.append(f"-l/--labels: {name} is given twice")
        else:
            quotas[name] = int(count)
    if not quotas and not problems:
        problems.append(f"-l/--labels: no label:count in {spec!r}")
    unknown = [name for name in quotas if name not in DEFAULT_LABELS]
    if unknown and not any_label:
        problems.append(f"-l/--labels: unknown label(s) {', '.join(unknown)}; the toolkit's labels are "
                        f"{', '.join(DEFAULT_LABELS)} (--any-label allows others)")
    return quotas, problems


def output_problems(output) -> list[str]:
    """The output file must be a file we can create: found now, not after the export."""
    path = Path(output)
    if path.is_dir():
        return [f"-o/--output {output} is a folder; give a file name, e.g. {path / 'export'}{path.suffix or '.xlsx'}"]
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return [f"-o/--output {output}: {parent} is a file, not a folder"]
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        return [f"-o/--output {output}: no permission to write in {parent}"]
    return []


def check_args(args) -> tuple[dict[str, int], list[str]]:
    """Every problem with the flags, reported at once before anything connects."""
    problems, quotas = [], {}
    fields = list(dict.fromkeys(f.strip() for f in args.fields.split(",") if f.strip()))
    if not args.list_labels:
        if not args.labels:
            problems.append('give the quotas with -l/--labels, e.g. -l "正常:15000,暴恐:6000"')
        else:
            quotas, more = parse_quotas(args.labels, args.any_label)
            problems += more
        if not args.output:
            problems.append("give the output file with -o/--output (.xlsx, .csv, .jsonl or .parquet)")
        elif output_problems(args.output):
            problems += output_problems(args.output)
        else:
            try:
                fmt = table_format(args.output)
            except UserError as e:
                problems.append(str(e))
            else:
                if fmt == ".xlsx" and sum(quotas.values()) + 1 > EXCEL_MAX_ROWS:
                    problems.append(f"{args.output}: the quotas total {sum(quotas.values()):,} rows, more than "
                                    f"Excel's limit of {EXCEL_MAX_ROWS - 1:,}; write .csv, .jsonl or .parquet")
    if args.seed is not None and not args.random:
        problems.append("--seed only applies to a --random sample; add --random")
    problems += connection_problems(args)
    for flag, value in (("--label-field", args.label_field), ("--text-field", args.text_field)):
        if value is not None and not value.strip():
            problems.append(f"{flag} must not be empty")
    if problems:
        raise UserError("; ".join(problems))
    return quotas, fields


# --- choosing rows ------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Doc:
    id: object
    text: str
    key: str                 # the text as compared for duplicates and exclusion (surrounding spaces dropped)
    labels: tuple[str, ...]  # the quota labels it carries, in -l order
    label_value: object      # the label field as stored, exported if asked for
    rank: int = 0


@dataclass
class Choice:
    rows: list[tuple[Doc, str]]                        # (document, the label it was chosen for), in order
    per_label: dict[str, Counter]                      # carry/no_text/excluded/other/dup/exported per label
    totals: Counter = field(default_factory=Counter)   # documents counted once: no_text/excluded/dup
    complete: bool = True                              # False when the ordered scan stopped early
    violations: set = field(default_factory=set)       # labels whose kept candidates ran out (random)


def rank_key(seed: int, key: str, _id) -> int:
    """The random order: sha256 of seed and text; equal texts are ordered by a hash of their _id."""
    import bson

    head = hashlib.sha256(f"{seed}\0{key}".encode("utf-8")).digest()[:16]
    tie = hashlib.sha256(bson.encode({"_id": _id})).digest()[:8]
    return int.from_bytes(head + tie, "big")


def projection(names) -> dict:
    """{name: 1}, leaving out 'a.b' when 'a' is asked for too (MongoDB refuses overlapping paths)."""
    names = set(names)
    return {n: 1 for n in sorted(names) if not any(n.startswith(other + ".") for other in names)}


def stream(coll, query: dict, fields: dict, sort_by_id: bool, desc: str):
    """Documents of a query in batches, with a progress bar; network errors propagate (never a silent end)."""
    from tqdm import tqdm

    cursor = coll.find(query, fields, batch_size=SCAN_BATCH)
    if sort_by_id:
        cursor = cursor.sort("_id", 1)
    with cursor, tqdm(desc=desc, unit=" docs", disable=None, leave=False, file=sys.stderr) as bar:
        for doc in cursor:
            bar.update(1)
            yield doc


def eligible(raw, quotas, args, excluded: set, choice: Choice):
    """Documents that may be exported: they carry a quota label and a text that is not excluded."""
    order = {label: i for i, label in enumerate(quotas)}
    for d in raw:
        value = get_path(d, args.label_field)
        values = value if isinstance(value, list) else [value]
        labels = tuple(sorted({v for v in values if isinstance(v, str) and v in order}, key=order.__getitem__))
        if not labels:
            continue
        for label in labels:
            choice.per_label[label]["carry"] += 1
        text = get_path(d, args.text_field)
        reason = ("no_text" if not isinstance(text, str) or not text.strip() else
                  "excluded" if text.strip() in excluded else None)
        if reason:
            choice.totals[reason] += 1
            for label in labels:
                choice.per_label[label][reason] += 1
            continue
        yield Doc(d["_id"], text, text.strip(), labels, value)


def assign(docs, quotas: dict[str, int], choice: Choice, bounds: dict | None = None) -> Choice:
    """Walk documents in order; each goes to the first of its labels with room; a repeated text is skipped.

    `bounds[label]` is the rank of the worst candidate kept for a label whose candidates were cut off: giving
    that label a document ranked beyond it, or ending with the label short, means candidates it should have
    seen were not kept -- recorded in choice.violations so the caller rescans with more."""
    room, seen = dict(quotas), set()
    for doc in docs:
        open_labels = [label for label in doc.labels if room[label] > 0]
        if not open_labels:
            continue
        if doc.key in seen:
            choice.totals["dup"] += 1
            for label in open_labels:
                choice.per_label[label]["dup"] += 1
            continue
        label = open_labels[0]
        if bounds and bounds.get(label) is not None and doc.rank > bounds[label]:
            choice.violations.add(label)
            room[label] = 0  # keep walking to find every label that needs more candidates in one go
            continue
        choice.rows.append((doc, label))
        seen.add(doc.key)
        room[label] -= 1
        choice.per_label[label]["exported"] += 1
        for other in open_labels[1:]:
            choice.per_label[other]["other"] += 1
        if not any(room.values()):
            choice.complete = False  # stopped early: documents after this one were not counted
            break
    if bounds:
        choice.violations |= {label for label, n in room.items() if n > 0 and bounds.get(label) is not None}
    return choice


def new_choice(quotas) -> Choice:
    return Choice(rows=[], per_label={label: Counter() for label in quotas})


def choose_ordered(coll, quotas, args, excluded) -> Choice:
    """The first documents by _id: the scan stops as soon as every quota is full."""
    choice = new_choice(quotas)
    raw = stream(coll, {args.label_field: {"$in": list(quotas)}},
                 projection(["_id", args.text_field, args.label_field]), sort_by_id=True, desc="scan")
    assign(eligible(raw, quotas, args, excluded, choice), quotas, choice)
    raw.close()  # closes the cursor when the scan stopped early
    return choice


def choose_random(coll, quotas, args, excluded, seed: int) -> Choice:
    """Keep the best-ranked few per label while streaming (a bounded heap each), then walk them in rank order.
    If a label's kept candidates run out (most went to other labels or repeat texts), rescan keeping more."""
    caps = {label: k + max(100, k // 4) for label, k in quotas.items()}
    while True:
        choice = new_choice(quotas)
        heaps, seen = {label: [] for label in quotas}, Counter()
        raw = stream(coll, {args.label_field: {"$in": list(quotas)}},
                     projection(["_id", args.text_field, args.label_field]), sort_by_id=False, desc="scan")
        for i, doc in enumerate(eligible(raw, quotas, args, excluded, choice)):
            doc.rank = rank_key(seed, doc.key, doc.id)
            for label in doc.labels:
                heap = heaps[label]
                seen[label] += 1
                if len(heap) < caps[label]:
                    heapq.heappush(heap, (-doc.rank, i, doc))  # max-heap on rank: the worst kept is on top
                elif doc.rank < -heap[0][0]:
                    heapq.heapreplace(heap, (-doc.rank, i, doc))
        # a label whose candidates were cut off may only use documents ranked up to its worst kept one
        bounds = {label: -heap[0][0] if seen[label] > len(heap) else None for label, heap in heaps.items()}
        merged = {id(doc): doc for heap in heaps.values() for _, _, doc in heap}
        assign(sorted(merged.values(), key=lambda d: d.rank), quotas, choice, bounds)
        choice.complete = True  # every document was counted, even if the walk stopped early
        if not choice.violations:
            return choice
        for label in sorted(choice.violations, key=list(quotas).index):
            print(f"re-scanning: the {caps[label]:,} best-ranked candidates kept for {label} were not enough "
                  f"(many went to other labels or repeat texts); keeping {4 * caps[label]:,}")
            caps[label] *= 4


# --- output -------------------------------------------------------------------------------------------------

def cell(value):
    """A value as a table cell: lists as 'a, b', sub-documents as JSON, ObjectId and the like as text."""
    import datetime

    if value is None or isinstance(value, (str, bool, int, float, datetime.datetime)):
        return value
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(str(v) for v in value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def fetch_fields(coll, docs: list[Doc], names: list[str]) -> dict:
    """_id -> {field: value} for the chosen documents, in chunks of FETCH_CHUNK _ids."""
    from tqdm import tqdm

    found = {}
    if not names:
        return found
    with tqdm(total=len(docs), desc="fetch", unit=" docs", disable=None, leave=False, file=sys.stderr) as bar:
        for start in range(0, len(docs), FETCH_CHUNK):
            ids = [d.id for d in docs[start:start + FETCH_CHUNK]]
            for d in coll.find({"_id": {"$in": ids}}, projection(names), batch_size=FETCH_CHUNK):
                found[d["_id"]] = d
            bar.update(len(ids))
    missing = sum(d.id not in found for d in docs)
    if missing:
        raise UserError(f"{missing} chosen document(s) disappeared from the collection while exporting; run again")
    return found


def build_table(choice: Choice, fields: list[str], args, fetched: dict):
    import pandas as pd

    columns = [TEXT_COLUMN, LABEL_COLUMN] + [f for f in fields if f not in (TEXT_COLUMN, LABEL_COLUMN,
                                                                              args.text_field)]
    data = {TEXT_COLUMN: [doc.text for doc, _ in choice.rows], LABEL_COLUMN: [label for _, label in choice.rows]}
    for name in columns[2:]:
        values = [cell(str(doc.id) if name == "_id" else doc.label_value if name == args.label_field else
                       get_path(fetched[doc.id], name)) for doc, _ in choice.rows]
        # a field stored as a number in some documents and as text in others becomes text: parquet needs one type
        if len({float if type(v) is int else type(v) for v in values if v is not None}) > 1:
            values = [None if v is None else str(v) for v in values]
        data[name] = values
    return pd.DataFrame(data, columns=columns)


def report(choice: Choice, quotas) -> list[str]:
    """The per-label summary on stdout; returns one warning per label that fell short of its quota."""
    more = "" if choice.complete else "+"
    rows, short = [], []
    for label, quota in quotas.items():
        c = choice.per_label[label]
        rows.append([label, f"{quota:,}", f"{c['carry']:,}{more}", f"{c['exported']:,}"])
        if c["exported"] < quota:
            short.append(f"{label}: quota {quota:,} but only {c['exported']:,} can be exported ({c['carry']:,} "
                         f"documents carry the label; {c['other']:,} went to an earlier label, {c['dup']:,} "
                         f"repeat an exported text, {c['excluded']:,} are excluded, {c['no_text']:,} have no text)")
    rows.append(["total", f"{sum(quotas.values()):,}", "", f"{len(choice.rows):,}"])
    print_table(["label", "quota", "found", "exported"], rows)
    t = choice.totals
    print(f"dropped: {t['dup']:,} duplicate text(s), {t['excluded']:,} excluded text(s), "
          f"{t['no_text']:,} document(s) without text" + ("" if choice.complete else
                                                          "  (+: the scan stopped once every quota was full)"))
    return short


def read_excluded(paths) -> set:
    texts = set()
    for path in paths:
        df = read_table(path)
        if TEXT_COLUMN not in df.columns:
            raise UserError(f"{path}: no column {TEXT_COLUMN} (found {', '.join(map(str, df.columns))}); "
                            "--exclude-file takes earlier exports of this script")
        texts.update(str(t).strip() for t in df[TEXT_COLUMN].dropna())
    return texts


def list_labels(coll, args) -> None:
    pipeline = [{"$project": {"l": f"${args.label_field}"}}, {"$unwind": "$l"},
                {"$group": {"_id": "$l", "n": {"$sum": 1}}}, {"$sort": {"n": -1, "_id": 1}}]
    rows = [[str(r["_id"]), f"{r['n']:,}"] for r in coll.aggregate(pipeline)]
    print(f"labels in {args.db}.{args.collection} (field {args.label_field}):")
    print_table(["label", "documents"], rows)


# --- main ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)  # before importing pymongo: --help and argument errors need none of it
    from pymongo.errors import PyMongoError

    quotas, fields = check_args(args)
    t0 = time.time()
    excluded = read_excluded(args.exclude)
    if args.exclude:
        print(f"excluding {len(excluded):,} distinct text(s) from {', '.join(map(str, args.exclude))}")
    seed = args.seed
    if args.random and seed is None:
        seed = random.SystemRandom().randrange(2**31)
        print(f"seed {seed} (chosen at random; pass --seed {seed} to repeat this sample)")
    password = read_password(args)

    client = None
    try:
        client = connect(args, password, appname="get_data_by_labels")
        others = [f for f in fields if f not in (TEXT_COLUMN, LABEL_COLUMN, "_id", args.text_field,
                                                 args.label_field)]
        need = [(args.label_field, "--label-field")]
        if not args.list_labels:
            need += [(args.text_field, "--text-field")] + [(f, "-f/--fields") for f in others]
        coll = open_collection(client, args, need)
        print(f"reading {args.db}.{args.collection} on {server_name(args)}"
              + (f" as {args.username}" if args.username else ""))
        if args.list_labels:
            list_labels(coll, args)
            return 0
        if args.random:
            print(f"random sample, seed {seed}: documents ranked by sha256(seed, text)")
            choice = choose_random(coll, quotas, args, excluded, seed)
        else:
            print("first documents by _id (add --random --seed N for a random sample)")
            choice = choose_ordered(coll, quotas, args, excluded)
        fetched = fetch_fields(coll, [doc for doc, _ in choice.rows], others)
    except PyMongoError as e:
        raise mongo_error(e, args) from None
    finally:
        if client is not None:
            client.close()

    short = report(choice, quotas)
    if short and args.strict:
        raise UserError("--strict: " + "; ".join(short))
    for line in short:
        print(f"warning: {line}; taking all of them (--strict makes this an error)", file=sys.stderr)
    if not choice.rows:
        raise UserError(f"no document of {args.db}.{args.collection} matched the quotas; nothing written")
    df = build_table(choice, fields, args, fetched)
    try:
        write_table(df, args.output)
    except OSError as e:  # atomic: nothing is left behind
        raise UserError(f"cannot write {args.output}: {e.strerror or e}; nothing was written") from None
    print(f"wrote {len(df):,} rows x {len(df.columns)} columns ({', '.join(df.columns)}) to {args.output} "
          f"in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    exit_script(main)
