"""Time get_data_by_labels.py exporting 10,000 rows from a local MongoDB-wire server (SecantusDB).

    python tools/bench_export.py                       # 20,000 documents loaded, 10,000 rows exported
    python tools/bench_export.py --docs 100000 --rows 45000

Loads `--docs` synthetic documents (the demo texts of lft/demo.py, numbered to make enough distinct ones)
into a fresh server with authentication on, then runs the exporter as a user would (a subprocess, so the
time includes Python start-up and imports) for a random sample and for the ordered mode, with the fetch of
an extra field, into .xlsx and .parquet. Prints one line per run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.demo_mongo import REPO, create_user, load, start_server, stop_server  # noqa: E402

LABELS = ("正常", "政治安全", "暴恐", "歧视", "色情低俗", "违法违规")


def documents(n: int) -> list[dict]:
    from lft.demo import demo_records

    base = {}
    for r in demo_records(900, seed=0):
        base.setdefault(r["extracted_label"], []).append(r["text_cn"])
    docs = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        texts = base[label]
        k = i // len(LABELS)
        text = texts[k % len(texts)] + ("" if k < len(texts) else f"（{k // len(texts)}）")
        docs.append({"text_cn": text, "n_labels": [label] if i % 3 else label, "source_id": i})
    return docs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=20_000, help="documents in the collection (default: 20,000)")
    p.add_argument("--rows", type=int, default=10_000, help="rows to export (default: 10,000)")
    args = p.parse_args(argv)

    quotas = {label: args.rows // len(LABELS) for label in LABELS}
    quotas["正常"] += args.rows - sum(quotas.values())
    spec = ",".join(f"{k}:{v}" for k, v in quotas.items())
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        storage, user, password = Path(tmp) / "db", "bench", "bench-password"
        docs = documents(args.docs)
        proc, port = start_server(storage, 0, auth=False)
        try:
            create_user(port, user, password, "scanadata")
            t0 = time.time()
            load(port, "scanadata", "data_items", docs)
            print(f"loaded {len(docs):,} documents in {time.time() - t0:.1f} s", flush=True)
        finally:
            stop_server(proc)
        proc, port = start_server(storage, 0, auth=True)
        try:
            base = [sys.executable, str(REPO / "get_data_by_labels.py"), "--host", "127.0.0.1", "--port", str(port),
                    "-u", user, "--auth-database", "scanadata", "-l", spec]
            env = dict(os.environ, MONGO_PASSWORD=password)
            runs = [("random, seed 123, .xlsx", ["--random", "--seed", "123", "-f", "text_cn,n_labels", "-o",
                                                 f"{tmp}/r.xlsx"]),
                    ("random, seed 123, +source_id fetch, .parquet",
                     ["--random", "--seed", "123", "-f", "text_cn,n_labels,source_id", "-o", f"{tmp}/r.parquet"]),
                    ("ordered by _id, .xlsx", ["-f", "text_cn,n_labels", "-o", f"{tmp}/o.xlsx"])]
            for name, flags in runs:
                t0 = time.time()
                r = subprocess.run(base + flags, capture_output=True, text=True, env=env)
                took = time.time() - t0
                if r.returncode:
                    print(r.stdout + r.stderr)
                    return r.returncode
                inner = [x for x in r.stdout.splitlines() if x.startswith("wrote ")][-1]
                print(f"{name}: {took:.1f} s wall for the command ({inner.split(' in ')[-1]} inside it); {inner}",
                      flush=True)
        finally:
            stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
