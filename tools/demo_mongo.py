"""A local MongoDB-wire server loaded with the demo data set, to try get_data_by_labels.py end to end.

    python tools/demo_mongo.py                         # 127.0.0.1:27017, serves until Ctrl-C or SIGTERM
    python tools/demo_mongo.py --port 27018 --storage /tmp/demo-db --per-label 500

It starts SecantusDB (`secantusd-py`, a MongoDB-wire server on WiredTiger; pip install -r
requirements-dev.txt) with authentication on, creates the user `admin` (readWrite on `scanadata`, password
from MONGO_PASSWORD or the printed demo password), loads the SYNTHETIC demo texts of lft/demo.py into
`scanadata.data_items` (`text_cn`, `n_labels` as a list or a string, `source_id`), and prints the exact
export command to try. SecantusDB is GPL-2.0-only: a dev/test tool here, never imported by the toolkit.

The test suite starts its servers with the same functions (start_server, create_user, stop_server).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_PASSWORD = "demo-password"  # only for this throw-away local server
LISTENING = re.compile(r"listening on [^\s:]+:(\d+)")


def start_server(storage, port: int = 0, auth: bool = True, host: str = "127.0.0.1", timeout: float = 60.0):
    """Start `secantusd-py` on `port` (0: any free one); return (process, port) once it listens.

    Its log goes to a file beside the storage folder, never to a pipe nobody drains (a full pipe would
    block the server)."""
    storage = Path(storage)
    log = storage.with_name(storage.name + ".log")
    daemon = shutil.which("secantusd-py", path=str(Path(sys.executable).parent)) or shutil.which("secantusd-py")
    if daemon is None:
        raise SystemExit("secantusd-py not found: pip install -r requirements-dev.txt (SecantusDB)")
    cmd = [daemon, "--host", host, "--port", str(port), "--storage-path", str(storage), "--standalone"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd + (["--auth"] if auth else []), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            m = LISTENING.search(log.read_text(errors="replace"))
            if m:
                return proc, int(m.group(1))
            if proc.poll() is not None:
                raise SystemExit(f"secantusd-py exited with status {proc.returncode}:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
    except BaseException:  # Ctrl-C or SIGTERM while it starts: the caller never got the process to stop
        stop_server(proc)
        raise
    stop_server(proc)
    raise SystemExit(f"secantusd-py did not start listening within {timeout:.0f} s; see {log}")


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def create_user(port: int, user: str, password: str, db: str, host: str = "127.0.0.1") -> None:
    """Create (or reset) `user` with readWrite on `db`. Needs a server started without auth: there is no
    localhost exception, so users are made first and the server restarted with --auth."""
    from pymongo import MongoClient

    with MongoClient(host, port, serverSelectionTimeoutMS=5000) as client:
        target = client[db]
        if target.command("usersInfo", user)["users"]:
            target.command("dropUser", user)
        target.command("createUser", user, pwd=password, roles=[{"role": "readWrite", "db": db}])


def load(port: int, db: str, collection: str, docs: list[dict], host: str = "127.0.0.1") -> None:
    from pymongo import MongoClient

    with MongoClient(host, port, serverSelectionTimeoutMS=5000) as client:
        client[db].drop_collection(collection)
        for start in range(0, len(docs), 5000):
            client[db][collection].insert_many(docs[start:start + 5000], ordered=True)


def demo_documents(per_label: int, seed: int = 0) -> list[dict]:
    """The synthetic demo records as MongoDB documents: `n_labels` a one-element list for two in three
    documents and a plain string for the rest (both shapes occur in real collections)."""
    sys.path.insert(0, str(REPO))
    from lft.demo import demo_records

    return [{"text_cn": r["text_cn"], "n_labels": r["extracted_label"] if i % 3 == 2 else [r["extracted_label"]],
             "source_id": f"demo-{i:06d}"} for i, r in enumerate(demo_records(per_label, seed))]


class Terminated(Exception):
    """SIGTERM arrived: stop the server, delete the temporary storage, exit 143."""


def _terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean stop; a second SIGTERM must not interrupt it
    raise Terminated


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Serve the demo data set on a local MongoDB-wire server until Ctrl-C.")
    p.add_argument("--port", type=int, default=27017, help="port to listen on (default: 27017)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--storage", default=None, help="WiredTiger folder (default: a temporary one, deleted on exit)")
    p.add_argument("--per-label", type=int, default=500, help="demo texts per label (default: 500, at most 900)")
    p.add_argument("--db", default="scanadata")
    p.add_argument("--collection", default="data_items")
    p.add_argument("--user", default="admin")
    args = p.parse_args(argv)
    if not 1 <= args.per_label <= 900:
        p.error("--per-label must be between 1 and 900 (the demo templates give 960 distinct texts for 歧视)")

    # SIGTERM (kill, systemd, a CI runner's cleanup) would end Python without running the `finally`s below and
    # leave the server running on its port: turn it into an exception that unwinds through them
    signal.signal(signal.SIGTERM, _terminated)
    password = os.environ.get("MONGO_PASSWORD") or DEMO_PASSWORD
    tmp = None if args.storage else tempfile.mkdtemp(prefix="demo-mongo-")
    storage = Path(args.storage or tmp) / "db"
    storage.parent.mkdir(parents=True, exist_ok=True)
    try:
        docs = demo_documents(args.per_label)
        proc, port = start_server(storage, 0, auth=False, host="127.0.0.1")
        try:
            create_user(port, args.user, password, args.db)
            load(port, args.db, args.collection, docs)
        finally:
            stop_server(proc)
        proc, port = start_server(storage, args.port, auth=True, host=args.host)
        try:
            n = args.per_label
            quotas = ",".join(f"{label}:{q}" for label, q in [("正常", n // 2), ("政治安全", n // 5), ("暴恐", n // 5),
                                                             ("歧视", n // 5), ("色情低俗", n // 5), ("违法违规", n // 5)])
            shown = "$MONGO_PASSWORD" if os.environ.get("MONGO_PASSWORD") else DEMO_PASSWORD
            print(f"demo MongoDB server on {args.host}:{port}: {len(docs):,} synthetic documents in "
                  f"{args.db}.{args.collection}; user {args.user} (readWrite on {args.db}); storage {storage}",
                  flush=True)
            print("try:", flush=True)
            print(f'MONGO_PASSWORD={shown} python {os.path.relpath(REPO / "get_data_by_labels.py")} --host {args.host} '
                  f'--port {port} -u {args.user} --auth-database {args.db} --db {args.db} '
                  f'--collection {args.collection} -l "{quotas}" -f text_cn,n_labels,source_id '
                  f'--random --seed 123 -o demo_train.xlsx', flush=True)
            print("serving until Ctrl-C", flush=True)
            proc.wait()
            return proc.returncode
        except KeyboardInterrupt:
            print("stopping", flush=True)
            return 0
        finally:
            stop_server(proc)
    except Terminated:  # the server was stopped by the `finally` above
        print("stopped (SIGTERM)", flush=True)
        return 143
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
