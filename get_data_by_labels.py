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
import getpass
import hashlib
import heapq
import json
import math
import os
import random
import re
import sys
import time
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lft.common import ArgumentParser, UserError, display_width, redact, run_cli
from lft.labels import DEFAULT_LABELS, clean_label
from lft.tables import EXCEL_MAX_ROWS, read_table, table_format, write_table

TEXT_COLUMN, LABEL_COLUMN = "text_cn", "extracted_label"  # what train_lora.py reads
SCAN_BATCH = 1000        # documents per getMore while streaming _id + text + labels
FETCH_CHUNK = 100        # _ids per `$in` when fetching the other fields: `$in` slows down with long lists
SOCKET_TIMEOUT_S = 300   # a query may scan a large unindexed collection before its first batch
MAX_TIMEOUT_S = 86_400   # --timeout: a day; pymongo needs a finite number of milliseconds


def parse_args(argv=None) -> argparse.Namespace:
    head, usage = __doc__.split("\n\n", 1)
    p = ArgumentParser(description=head, epilog=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("connection")
    g.add_argument("--host", default=None, help="MongoDB host (default: localhost)")
    g.add_argument("--port", type=int, default=None, help="MongoDB port (default: 27017)")
    g.add_argument("--uri", default=None,
                   help="connection string instead of --host/--port, e.g. mongodb://h1,h2/?replicaSet=rs0; "
                        "no credentials in it: use -u and MONGO_PASSWORD")
    g.add_argument("-u", "--username", default=None, help="user name; the password is read from MONGO_PASSWORD "
                                                          "or prompted for")
    g.add_argument("--auth-database", default=None, help="database the user is defined in (default: admin)")
    g.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server to answer (default: 5)")
    g = p.add_argument_group("source")
    g.add_argument("-d", "--db", "--database", dest="db", default="scanadata", help="database (default: scanadata)")
    g.add_argument("-c", "--collection", default="data_items", help="collection (default: data_items)")
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
    if args.uri and (args.host or args.port):
        problems.append("give either --uri or --host/--port, not both")
    # a host has no "@": one anywhere before the query means user:password@ (the password may hold "/")
    if args.uri and re.match(r"^[a-z][a-z0-9+.-]*:/+[^?#]*@", args.uri, re.I):
        problems.append("--uri must not carry credentials: put the user in -u/--username and the password in "
                        "the environment variable MONGO_PASSWORD")
    if args.host and ("://" in args.host or "@" in args.host):  # pymongo takes a whole URI here, credentials too
        problems.append("--host takes a host name or address (e.g. db.internal), not a connection string or "
                        "user:password@host: a connection string goes in --uri, the user in -u/--username and "
                        "the password in MONGO_PASSWORD")
    if args.port is not None and not 1 <= args.port <= 65535:
        problems.append(f"--port must be between 1 and 65535, got {args.port}")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT_S):
        problems.append(f"--timeout must be a number of seconds > 0 and at most {MAX_TIMEOUT_S:,}, got {args.timeout}")
    for flag, value in (("--db", args.db), ("-c/--collection", args.collection), ("--label-field", args.label_field),
                        ("--text-field", args.text_field), ("--auth-database", args.auth_database)):
        if value is not None and not value.strip():
            problems.append(f"{flag} must not be empty")
    if problems:
        raise UserError("; ".join(problems))
    return quotas, fields


# --- connecting ---------------------------------------------------------------------------------------------

def read_password(args) -> str | None:
    if not args.username:
        return None
    password = os.environ.get("MONGO_PASSWORD")
    if password:
        return password
    try:
        return getpass.getpass(f"MongoDB password for {args.username}: ")
    except EOFError:
        raise UserError(f"no password for user '{args.username}': set the environment variable MONGO_PASSWORD "
                        "or run in a terminal to be prompted") from None


def server_name(args) -> str:
    return redact(args.uri if args.uri else f"{args.host or 'localhost'}:{args.port or 27017}")


def connect(args, password):
    from pymongo import MongoClient

    ms = int(args.timeout * 1000)
    kw = dict(serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=SOCKET_TIMEOUT_S * 1000,
              appname="get_data_by_labels")
    if args.username:
        kw.update(username=args.username, password=password)
        if args.auth_database:
            kw["authSource"] = args.auth_database
    try:
        with warnings.catch_warnings():  # pymongo only warns about an unknown or invalid --uri option, and drops it
            warnings.simplefilter("error", UserWarning)
            if args.uri:
                return MongoClient(args.uri, **kw)
            return MongoClient(args.host or "localhost", args.port or 27017, **kw)
    except (ValueError, TypeError, OSError, UserWarning) as e:  # option checks that are not PyMongoErrors
        raise UserError(f"cannot use the connection settings for {server_name(args)} ({redact(str(e))}); check "
                        "--uri (or --host/--port)") from None


def mongo_error(e: Exception, args) -> UserError:
    """One line for each way talking to the server can fail. Never echoes a password (URIs are redacted)."""
    from pymongo.errors import AutoReconnect, OperationFailure, ServerSelectionTimeoutError

    text = re.sub(r" \(configured timeouts:[^)]*\)", "", " ".join(redact(str(e)).split()))
    where = server_name(args)
    if isinstance(e, ServerSelectionTimeoutError):
        m = re.search(r"^\S+: (.*?), Timeout:", text)
        reason = m.group(1) if m else text.split(", Timeout:")[0][:200]
        return UserError(f"cannot reach MongoDB at {where} within {args.timeout:g} s ({reason}); check "
                         "--host/--port (or --uri) and that the server is running")
    if isinstance(e, OperationFailure):
        message = text.split(", full error:")[0]
        if e.code == 18:
            return UserError(f"authentication failed for user '{args.username}' on database "
                             f"'{args.auth_database or 'admin'}'; check -u/--username, --auth-database and "
                             "MONGO_PASSWORD")
        if e.code == 13:
            hint = ("the server requires a login: give -u/--username" if not args.username else
                    f"check that user '{args.username}' may read database '{args.db}'")
            return UserError(f"not authorized ({message}); {hint}")
        return UserError(f"MongoDB refused the query on {args.db}.{args.collection}: {message}")
    if isinstance(e, AutoReconnect):
        return UserError(f"lost the connection to MongoDB at {where} ({text[:200]}); nothing was written")
    return UserError(f"MongoDB error at {where}: {text[:300]}")


def open_collection(client, args, need_fields: list[tuple[str, str]]):
    """The collection, after checking it and the fields exist; errors say which and where."""
    client.admin.command("ping")  # server selection and authentication happen here
    db = client[args.db]
    names = db.list_collection_names()
    if args.collection not in names:
        have = (f"it has: {', '.join(sorted(names)[:20])}" if names else
                "the database is empty or does not exist")
        raise UserError(f"collection '{args.collection}' not found in database '{args.db}' ({have}); "
                        "check --db/--collection")
    coll = db[args.collection]
    missing = []
    for name, flag in need_fields:
        # stops at the first document that has it; a full scan only when the field is missing everywhere
        if coll.find_one({name: {"$exists": True}}, {"_id": 1}) is None:
            missing.append(f"'{name}' ({flag})")
    if missing:
        raise UserError(f"no document in {args.db}.{args.collection} has the field(s) {', '.join(missing)}")
    return coll


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


def get_path(doc: dict, path: str):
    value = doc
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list):
            value = [v.get(part) for v in value if isinstance(v, dict)]
        else:
            return None
    return value


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


def print_table(header: list[str], rows: list[list[str]]) -> None:
    table = [header] + rows
    widths = [max(display_width(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(s + " " * (w - display_width(s)) if i == 0 else " " * (w - display_width(s)) + s
                        for i, (s, w) in enumerate(zip(r, widths))))


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
    from pymongo.errors import PyMongoError

    args = parse_args(argv)
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
        client = connect(args, password)
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
    sys.exit(run_cli(main))
