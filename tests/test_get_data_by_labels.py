"""get_data_by_labels.py against a real MongoDB-wire server (SecantusDB, started here with authentication on).

Every expected export is computed by `reference()`, a brute-force statement of the documented rule over the
documents this file loaded: visit documents by _id (or by rank_key with --random), give each to the first
of its quota labels with room, skip texts already exported or excluded. No mock of pymongo anywhere.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bson import ObjectId

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import get_data_by_labels as gdl  # noqa: E402
from lft.common import run_cli  # noqa: E402
from lft.demo import demo_records  # noqa: E402
from lft.tables import read_table  # noqa: E402
from tools.demo_mongo import create_user, load, start_server, stop_server  # noqa: E402

USER, PASSWORD, DB, COLL = "admin", "pw-Секрет-密码-42", "scanadata", "data_items"
READER, READER_PASSWORD = "reader", "reader-pw-17"  # readAnyDatabase, defined in admin
N_OWN = 350          # demo texts per label before the edits below
N_VIOLENT = 120      # 暴恐 keeps only this many of its own texts: the scarce label
N_POL_MULTI = 60     # 政治安全 documents that also carry 暴恐
N_PORN_MULTI = 200   # 色情低俗 documents that also carry 违法违规
N_DUP_NORMAL = 30    # 正常 texts stored twice (one with surrounding spaces)
N_NO_TEXT = 7        # 正常 documents without a usable text
# texts that .xlsx once turned into something else: a control character (refused), a formula (a live cell),
# NA spellings (read back as empty), Excel's own escape written literally
SPECIAL_TEXTS = ["带控制字符\x07的文本", '=HYPERLINK("http://example.invalid","点我")', "NA", "#N/A", "_x0007_字面", "+1"]


def build_documents() -> list[dict]:
    """~1,900 documents: n_labels as list or string, multi-label documents, duplicate texts (within a label
    and across labels), documents without text, a label outside the quota set, ids of three BSON types."""
    by_label: dict[str, list[str]] = {}
    for r in demo_records(N_OWN, seed=11):
        by_label.setdefault(r["extracted_label"], []).append(r["text_cn"])
    rows = []
    for label, texts in by_label.items():
        if label == "暴恐":
            texts = texts[:N_VIOLENT]
        for i, text in enumerate(texts):
            labels = [label]
            if label == "政治安全" and i < N_POL_MULTI:
                labels = ["政治安全", "暴恐"]
            if label == "色情低俗" and i < N_PORN_MULTI:
                labels = ["违法违规", "色情低俗"] if i % 2 else ["色情低俗", "违法违规"]
            rows.append({"text_cn": text, "n_labels": labels})
    for i, text in enumerate(by_label["正常"][:N_DUP_NORMAL]):
        rows.append({"text_cn": f"  {text} " if i == 0 else text, "n_labels": ["正常"]})
    for text in by_label["歧视"][:10]:           # the same text under another label
        rows.append({"text_cn": text, "n_labels": "违法违规"})
    rows += [{"n_labels": ["正常"]}] * 4 + [{"text_cn": "  ", "n_labels": "正常"}] * 3
    rows += [{"text_cn": f"其他类文本{i}", "n_labels": ["其他"]} for i in range(25)]
    rows += [{"text_cn": text, "n_labels": "特殊"} for text in SPECIAL_TEXTS]
    docs = []
    for i, row in enumerate(rows):
        doc = dict(row)
        labels = doc["n_labels"]
        if isinstance(labels, list) and len(labels) == 1 and i % 2:
            doc["n_labels"] = labels[0]          # half the single labels as a plain string
        doc["_id"] = i if i % 97 == 0 else f"id-{i:05d}" if i % 89 == 0 else ObjectId()
        doc["source_id"] = i
        if i % 5 == 0:
            doc["meta"] = {"src": f"feed-{i % 3}"}
        if i % 400 == 0:
            doc["rare"] = "x"
        docs.append(doc)
    return docs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port, docs):
        self.port, self.docs = port, docs
        self.conn = ["--host", "127.0.0.1", "--port", str(port), "-u", USER, "--auth-database", DB]
        self.argv = self.conn + ["--db", DB, "--collection", COLL]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    from pymongo import MongoClient

    storage = tmp_path_factory.mktemp("mongo") / "db"
    docs = build_documents()
    proc, port = start_server(storage, 0, auth=False)  # users first: there is no localhost exception
    try:
        create_user(port, USER, PASSWORD, DB)
        with MongoClient("127.0.0.1", port) as client:
            client.admin.command("createUser", READER, pwd=READER_PASSWORD,
                                 roles=[{"role": "readAnyDatabase", "db": "admin"}])
        load(port, DB, COLL, docs)
        load(port, DB, COLL + "_reversed", docs[::-1])  # same documents, opposite insertion order
    finally:
        stop_server(proc)
    proc, port = start_server(storage, 0, auth=True)
    yield Server(port, docs)
    stop_server(proc)


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("MONGO_PASSWORD", PASSWORD)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# --- the rule, stated by brute force ------------------------------------------------------------------------

def id_order(_id):
    """BSON order of the _id types used here: numbers < strings < ObjectId."""
    return (0, _id, b"") if isinstance(_id, int) else (1, _id, b"") if isinstance(_id, str) else (2, "", _id.binary)


def reference(docs, quotas: dict, seed=None, exclude=()) -> list[tuple[str, str]]:
    exclude = {t.strip() for t in exclude}
    candidates = []
    for d in docs:
        value = d.get("n_labels")
        values = value if isinstance(value, list) else [value]
        labels = [label for label in quotas if label in values]
        text = d.get("text_cn")
        if labels and isinstance(text, str) and text.strip() and text.strip() not in exclude:
            candidates.append((d, labels))
    if seed is None:
        candidates.sort(key=lambda c: id_order(c[0]["_id"]))
    else:
        candidates.sort(key=lambda c: gdl.rank_key(seed, c[0]["text_cn"].strip(), c[0]["_id"]))
    room, seen, out = dict(quotas), set(), []
    for d, labels in candidates:
        open_labels = [label for label in labels if room[label]]
        if open_labels and d["text_cn"].strip() not in seen:
            out.append((d["text_cn"], open_labels[0]))
            seen.add(d["text_cn"].strip())
            room[open_labels[0]] -= 1
    return out


def quota_arg(quotas: dict) -> str:
    return ",".join(f"{k}:{v}" for k, v in quotas.items())


def pairs(df) -> list[tuple[str, str]]:
    return list(zip(df["text_cn"], df["extracted_label"]))


def export(server, out: Path, *flags, argv=None):
    assert gdl.main((argv or server.argv) + list(flags) + ["-o", str(out)]) == 0
    return read_table(out)


def fail(argv, capsys, out: Path | None = None) -> str:
    """Run as the CLI does; the error must be one line, exit status 2, and no file may be left behind."""
    capsys.readouterr()
    assert run_cli(gdl.main, argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    if out is not None:
        assert not out.exists()
        assert [p.name for p in out.parent.iterdir()] == [], "temporary file left behind"
    return err


BALANCED = {"正常": 300, "政治安全": 100, "暴恐": 100, "歧视": 100, "色情低俗": 100, "违法违规": 100}


# --- exports ------------------------------------------------------------------------------------------------

def test_issue_command_as_a_user_runs_it(server, tmp_path):
    """The issue's command line in a subprocess: .xlsx with text_cn, extracted_label, n_labels, exact counts
    per label, a summary on screen, and a file the trainer's loader accepts."""
    out = tmp_path / "balanced_train.xlsx"
    env = dict(os.environ, MONGO_PASSWORD=PASSWORD, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "get_data_by_labels.py"), *server.argv, "-l", quota_arg(BALANCED),
                        "-f", "text_cn,n_labels", "--random", "--seed", "123", "-o", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    df = read_table(out)
    assert list(df.columns) == ["text_cn", "extracted_label", "n_labels"]
    assert df["extracted_label"].value_counts().to_dict() == BALANCED
    assert pairs(df) == reference(server.docs, BALANCED, seed=123)
    assert df["text_cn"].str.strip().is_unique
    for labels, chosen in zip(df["n_labels"], df["extracted_label"]):
        assert chosen in labels.split(", ")
    assert re.search(r"^暴恐\s+100\s+180\s+100$", r.stdout, re.M), r.stdout
    assert re.search(r"^total\s+800\s+800$", r.stdout, re.M), r.stdout
    assert f"wrote 800 rows x 3 columns" in r.stdout

    from lft.data import DEFAULT_LABELS, load_split
    split = load_split(out)
    assert len(split) == 800
    assert [DEFAULT_LABELS[i] for i in split.labels] == list(df["extracted_label"])


def test_same_seed_same_rows_in_the_same_order_on_any_insertion_order(server, tmp_path, env):
    a = export(server, tmp_path / "a.jsonl", "-l", quota_arg(BALANCED), "--random", "--seed", "7", "-f",
               "text_cn,n_labels,source_id,_id")
    b = export(server, tmp_path / "b.parquet", "-l", quota_arg(BALANCED), "--random", "--seed", "7", "-f",
               "text_cn,n_labels,source_id,_id")
    rev = server.conn + ["--db", DB, "--collection", COLL + "_reversed"]
    c = export(server, tmp_path / "c.csv", "-l", quota_arg(BALANCED), "--random", "--seed", "7", "-f",
               "text_cn,n_labels,source_id,_id", argv=rev)
    assert pairs(a) == pairs(b) == pairs(c) == reference(server.docs, BALANCED, seed=7)
    assert list(a["source_id"]) == [int(x) for x in b["source_id"]] == [int(x) for x in c["source_id"]]
    assert [str(x) for x in a["_id"]] == [str(x) for x in c["_id"]]


def test_different_seeds_give_different_samples(server, tmp_path, env):
    a = export(server, tmp_path / "a.jsonl", "-l", quota_arg(BALANCED), "--random", "--seed", "123")
    b = export(server, tmp_path / "b.jsonl", "-l", quota_arg(BALANCED), "--random", "--seed", "456")
    assert pairs(b) == reference(server.docs, BALANCED, seed=456)
    assert a["extracted_label"].value_counts().to_dict() == b["extracted_label"].value_counts().to_dict()
    overlap = len(set(a["text_cn"]) & set(b["text_cn"]))
    assert overlap < 0.6 * len(a), overlap
    assert list(a["text_cn"][:20]) != list(b["text_cn"][:20])


def test_without_random_the_first_documents_by_id(server, tmp_path, env, capsys):
    quotas = {"正常": 50, "暴恐": 30, "违法违规": 40}
    df = export(server, tmp_path / "o.jsonl", "-l", quota_arg(quotas), "-f", "_id,n_labels")
    assert pairs(df) == reference(server.docs, quotas)
    assert df["extracted_label"].value_counts().to_dict() == quotas
    out = capsys.readouterr().out
    assert "the scan stopped once every quota was full" in out


def test_train_val_test_share_no_text(server, tmp_path, env, capsys):
    """The original workflow: train with seed 123, val with seed 456 and test with 789 from one collection."""
    q = {"正常": 100, "政治安全": 60, "暴恐": 40, "歧视": 60, "色情低俗": 60, "违法违规": 60}
    train = export(server, tmp_path / "train.xlsx", "-l", quota_arg(q), "--random", "--seed", "123")
    val = export(server, tmp_path / "val.csv", "-l", quota_arg(q), "--random", "--seed", "456",
                 "--exclude-file", str(tmp_path / "train.xlsx"))
    test = export(server, tmp_path / "test.jsonl", "-l", quota_arg(q), "--random", "--seed", "789",
                  "--exclude", str(tmp_path / "train.xlsx"), str(tmp_path / "val.csv"))
    sets = [set(df["text_cn"].str.strip()) for df in (train, val, test)]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    assert pairs(val) == reference(server.docs, q, seed=456, exclude=sets[0])
    assert pairs(test) == reference(server.docs, q, seed=789, exclude=sets[0] | sets[1])
    for df in (train, val, test):
        assert df["extracted_label"].value_counts().to_dict() == q
    out = capsys.readouterr().out
    assert f"excluding {len(sets[0] | sets[1]):,} distinct text(s)" in out


def test_multi_label_documents_are_exported_once_for_the_first_label_with_room(server, tmp_path, env, capsys):
    quotas = {"暴恐": 150, "政治安全": 350}
    df = export(server, tmp_path / "m.jsonl", "-l", quota_arg(quotas), "--random", "--seed", "3", "-f", "_id")
    expected = reference(server.docs, quotas, seed=3)
    assert pairs(df) == expected
    assert df["_id"].astype(str).is_unique and df["text_cn"].is_unique
    n = {label: sum(1 for _, x in expected if x == label) for label in quotas}
    assert n["暴恐"] == 150 and n["政治安全"] < 350  # multi-label documents taken by 暴恐 are not exported twice
    err = capsys.readouterr().err
    assert re.search(rf"政治安全: quota 350 but only {n['政治安全']} can be exported \(350 documents carry the "
                     rf"label; {350 - n['政治安全']} went to an earlier label, 0 repeat", err), err


def test_rescan_when_the_kept_candidates_go_to_an_earlier_label(server, tmp_path, env, capsys):
    """违法违规 (listed first) takes all 200 documents that also carry 色情低俗, so most of the candidates kept
    for 色情低俗 are used up: the exporter must notice and rescan, and still equal the rule."""
    quotas = {"违法违规": N_OWN + N_PORN_MULTI + 10, "色情低俗": 100}
    df = export(server, tmp_path / "r.jsonl", "-l", quota_arg(quotas), "--random", "--seed", "11")
    out = capsys.readouterr().out
    assert "re-scanning: the 200 best-ranked candidates kept for 色情低俗 were not enough" in out
    assert pairs(df) == reference(server.docs, quotas, seed=11)
    assert df["extracted_label"].value_counts().to_dict() == quotas


def test_duplicates_and_texts_missing_are_dropped_and_counted(server, tmp_path, env, capsys):
    df = export(server, tmp_path / "d.jsonl", "-l", "正常:1000,歧视:1000,违法违规:1000", "--random", "--seed", "5")
    assert df["text_cn"].str.strip().is_unique
    assert pairs(df) == reference(server.docs, {"正常": 1000, "歧视": 1000, "违法违规": 1000}, seed=5)
    counts = df["extracted_label"].value_counts().to_dict()
    # the 10 歧视 texts stored again under 违法违规 go to whichever copy ranks first
    assert counts["正常"] == N_OWN and counts["歧视"] + counts["违法违规"] == 2 * N_OWN + N_PORN_MULTI
    captured = capsys.readouterr()
    for label, carry in [("歧视", N_OWN), ("违法违规", N_OWN + N_PORN_MULTI + 10)]:
        assert (f"{label}: quota 1,000 but only {counts[label]} can be exported ({carry} documents carry the "
                f"label; 0 went to an earlier label, {carry - counts[label]} repeat an exported text") in captured.err
    assert f"dropped: {N_DUP_NORMAL + 10} duplicate text(s), 0 excluded text(s), {N_NO_TEXT} document(s) " \
           f"without text" in captured.out
    assert (f"正常: quota 1,000 but only {N_OWN} can be exported ({N_OWN + N_DUP_NORMAL + N_NO_TEXT} documents "
            f"carry the label; 0 went to an earlier label, {N_DUP_NORMAL} repeat an exported text, 0 are "
            f"excluded, {N_NO_TEXT} have no text)") in captured.err


def test_fields_columns_and_values(server, tmp_path, env):
    df = export(server, tmp_path / "f.jsonl", "-l", "正常:400", "-f", "text_cn,n_labels,source_id,meta.src,meta,rare")
    assert list(df.columns) == ["text_cn", "extracted_label", "n_labels", "source_id", "meta.src", "meta", "rare"]
    by_source = {d["source_id"]: d for d in server.docs}
    expected_rare = sum(1 for source in df["source_id"] if "rare" in by_source[source])
    assert df["rare"].notna().sum() == expected_rare > 0
    for row in df.astype(object).where(df.notna(), None).to_dict("records"):
        d = by_source[row["source_id"]]
        assert row["text_cn"] == d["text_cn"]
        labels = d["n_labels"]
        assert row["n_labels"] == (", ".join(labels) if isinstance(labels, list) else labels)
        assert row["meta.src"] == d.get("meta", {}).get("src")
        assert row["meta"] == ('{"src": "%s"}' % d["meta"]["src"] if "meta" in d else None)
        assert row["rare"] == d.get("rare")


def test_list_labels(server, env, capsys):
    assert gdl.main(server.argv + ["--list-labels"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^暴恐\s+{N_VIOLENT + N_POL_MULTI}$", out, re.M), out
    assert re.search(rf"^正常\s+{N_OWN + N_DUP_NORMAL + N_NO_TEXT}$", out, re.M), out
    assert re.search(r"^其他\s+25$", out, re.M), out


def test_short_label_warns_and_strict_fails(server, tmp_path, env, capsys):
    df = export(server, tmp_path / "s.jsonl", "-l", "暴恐:500", "--random", "--seed", "1")
    assert len(df) == N_VIOLENT + N_POL_MULTI
    err = capsys.readouterr().err
    assert "warning: 暴恐: quota 500 but only 180 can be exported (180 documents carry the label" in err
    err = fail(server.argv + ["-l", "暴恐:500", "--random", "--seed", "1", "--strict", "-o",
                              str(tmp_path / "strict" / "x.xlsx")], capsys)
    assert "--strict: 暴恐: quota 500 but only 180" in err
    assert not (tmp_path / "strict").exists() or not any((tmp_path / "strict").iterdir())


# --- errors: one line each, exit status 2, no output file -----------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("正常=10", "'正常=10' is not label:count"),
    ("正常:abc", "count for 正常 must be a whole number >= 1, got 'abc'"),
    ("正常:0,暴恐:5", "count for 正常 must be a whole number >= 1, got '0'"),
    ("正常:5,正常:6", "正常 is given twice"),
    ("暴力:10", "unknown label(s) 暴力; the toolkit's labels are 正常, 歧视"),
])
def test_bad_quotas(server, tmp_path, env, capsys, spec, message):
    out = tmp_path / "out" / "x.xlsx"
    out.parent.mkdir()
    err = fail(server.argv + ["-l", spec, "-o", str(out)], capsys, out)
    assert message in err


def test_full_width_quota_syntax_is_accepted(server, tmp_path, env):
    df = export(server, tmp_path / "w.jsonl", "-l", "正常：3，暴恐：2")
    assert df["extracted_label"].value_counts().to_dict() == {"正常": 3, "暴恐": 2}


@pytest.mark.parametrize("flags, message", [
    (["--timeout", "nan"], "--timeout must be a number of seconds > 0 and at most 86,400, got nan"),
    (["--timeout", "inf"], "--timeout must be a number of seconds > 0 and at most 86,400, got inf"),
    (["--timeout", "-1"], "--timeout must be a number of seconds > 0 and at most 86,400, got -1.0"),
    (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
    (["--auth-database", " ", "-u", "x"], "--auth-database must not be empty"),
    (["--db", ""], "--db must not be empty"),
    (["--uri", "mongodb://127.0.0.1:1/?bogusOption=1&tlsCertificateKeyFilePassword=K3Y"],
     "cannot use the connection settings for mongodb://127.0.0.1:1/?bogusOption=1&tlsCertificateKeyFilePassword=*** "
     "(Unknown option: bogusoption."),
    (["--uri", "mongodb://127.0.0.1:1/?tls=true&tlsCertificateKeyFile=/nonexistent.pem&"
      "tlsCertificateKeyFilePassword=K3Y"], "tlsCertificateKeyFilePassword=*** ([Errno 2] No such file or directory"),
])
def test_flag_values_that_tracebacked_are_one_line_errors(tmp_path, env, capsys, flags, message):
    out = tmp_path / "out" / "x.xlsx"
    out.parent.mkdir()
    err = fail(flags + ["-l", "正常:5", "-o", str(out)], capsys, out)
    assert message in err and "K3Y" not in err, err


def test_output_that_cannot_be_a_file_is_refused_before_connecting(tmp_path, capsys):
    (tmp_path / "folder.xlsx").mkdir()
    (tmp_path / "file").write_text("x")
    err = fail(["--port", "1", "-l", "正常:5", "-o", str(tmp_path / "folder.xlsx")], capsys)
    assert err == f"error: -o/--output {tmp_path / 'folder.xlsx'} is a folder; give a file name, e.g. " \
                  f"{tmp_path / 'folder.xlsx' / 'export.xlsx'}\n"
    err = fail(["--port", "1", "-l", "正常:5", "-o", str(tmp_path / "file" / "x.csv")], capsys)
    assert err == f"error: -o/--output {tmp_path / 'file' / 'x.csv'}: {tmp_path / 'file'} is a file, not a folder\n"


def test_several_flag_problems_reported_at_once(tmp_path, capsys):
    err = fail(["-l", "正常:x", "--seed", "3", "-o", str(tmp_path / "a.txt")], capsys)
    assert "count for 正常" in err and "unsupported file type .txt" in err and "--seed only applies" in err


def test_wrong_password_and_unknown_user(server, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out" / "x.xlsx"
    out.parent.mkdir()
    monkeypatch.setenv("MONGO_PASSWORD", "wrong-Пароль")
    err = fail(server.argv + ["-l", "正常:5", "-o", str(out)], capsys, out)
    assert "authentication failed for user 'admin' on database 'scanadata'" in err
    assert "wrong-Пароль" not in err
    monkeypatch.setenv("MONGO_PASSWORD", PASSWORD)
    argv = ["--host", "127.0.0.1", "--port", str(server.port), "-u", "nobody", "--auth-database", DB]
    err = fail(argv + ["-l", "正常:5", "-o", str(out)], capsys, out)
    assert "authentication failed for user 'nobody' on database 'scanadata'" in err
    err = fail(["--host", "127.0.0.1", "--port", str(server.port), "-l", "正常:5", "-o", str(out)], capsys, out)
    assert "not authorized" in err and "give -u/--username" in err


def test_unreachable_server_fails_within_seconds(tmp_path, env, capsys):
    out = tmp_path / "out" / "x.xlsx"
    out.parent.mkdir()
    port = free_port()
    t0 = time.time()
    err = fail(["--port", str(port), "--host", "127.0.0.1", "-u", USER, "-l", "正常:5", "-o", str(out)], capsys, out)
    assert time.time() - t0 < 9, "default timeout must be a few seconds, not pymongo's 30"
    assert f"cannot reach MongoDB at 127.0.0.1:{port} within 5 s" in err and "Connection refused" in err


def test_missing_collection_database_and_fields(server, tmp_path, env, capsys, monkeypatch):
    out = tmp_path / "out" / "x.xlsx"
    out.parent.mkdir()
    err = fail(server.argv + ["--collection", "nope", "-l", "正常:5", "-o", str(out)], capsys, out)
    assert f"collection 'nope' not found in database 'scanadata' (it has: {COLL}, {COLL}_reversed)" in err
    err = fail(server.conn + ["--db", "nodb", "-l", "正常:5", "-o", str(out)], capsys, out)
    assert "not authorized" in err and "may read database 'nodb'" in err
    err = fail(server.argv + ["-l", "正常:5", "-f", "text_cn,nosuch,other", "-o", str(out)], capsys, out)
    assert "no document in scanadata.data_items has the field(s) 'nosuch' (-f/--fields), 'other' (-f/--fields)" \
           in err
    err = fail(server.argv + ["-l", "正常:5", "--label-field", "labels", "-o", str(out)], capsys, out)
    assert "has the field(s) 'labels' (--label-field)" in err
    # a user who may read every database sees that this one does not exist
    monkeypatch.setenv("MONGO_PASSWORD", READER_PASSWORD)
    reader = ["--host", "127.0.0.1", "--port", str(server.port), "-u", READER]
    err = fail(reader + ["--db", "nodb", "-l", "正常:5", "-o", str(out)], capsys, out)
    assert "collection 'data_items' not found in database 'nodb' (the database is empty or does not exist)" in err
    df = export(server, tmp_path / "reader.jsonl", "-l", "正常:5", argv=reader)  # and can export from scanadata
    assert len(df) == 5


def test_excel_limits(server, tmp_path, env, capsys):
    out = tmp_path / "out" / "x.xlsx"
    out.parent.mkdir()
    err = fail(server.argv + ["-l", "正常:1048576", "-o", str(out)], capsys, out)
    assert "the quotas total 1,048,576 rows, more than Excel's limit of 1,048,575" in err


@pytest.mark.parametrize("suffix", ["xlsx", "csv", "jsonl", "parquet"])
def test_every_text_is_exported_exactly_as_stored(server, tmp_path, env, suffix):
    """Control characters, formulas, NA spellings: the file holds the text, and reading it gives it back."""
    df = export(server, tmp_path / f"s.{suffix}", "-l", f"特殊:{len(SPECIAL_TEXTS)}", "--any-label")
    assert sorted(df["text_cn"]) == sorted(SPECIAL_TEXTS)
    if suffix == "xlsx":
        import openpyxl

        cells = [c for c in openpyxl.load_workbook(tmp_path / "s.xlsx").active["A"][1:]]
        assert {c.data_type for c in cells} == {"s"}  # strings, never a formula


def test_uri_is_used_and_never_carries_the_password(server, tmp_path, env, capsys):
    uri = f"mongodb://127.0.0.1:{server.port}/?directConnection=true"
    df = export(server, tmp_path / "u.jsonl", "-l", "歧视:4", argv=["--uri", uri, "-u", USER, "--auth-database", DB])
    assert len(df) == 4
    out = tmp_path / "out" / "x.xlsx"
    out.parent.mkdir()
    err = fail(["--uri", f"mongodb://{USER}:{PASSWORD}@127.0.0.1:{server.port}/", "-l", "正常:5", "-o", str(out)],
               capsys, out)
    assert "--uri must not carry credentials" in err and PASSWORD not in err
    err = fail(["--uri", f"mongodb://{USER}:pa/ss@127.0.0.1:{server.port}/", "-l", "正常:5", "-o", str(out)],
               capsys, out)  # a "/" in the password
    assert "--uri must not carry credentials" in err and "pa/ss" not in err


def test_host_with_credentials_is_refused_and_never_printed(server, tmp_path, env, capsys):
    """pymongo takes a whole URI as the host: credentials there bypassed the --uri check and were printed."""
    out = tmp_path / "out" / "x.xlsx"
    out.parent.mkdir()
    for host in (f"mongodb://{USER}:{PASSWORD}@127.0.0.1", f"{USER}:{PASSWORD}@127.0.0.1"):
        err = fail(["--host", host, "--port", str(server.port), "-l", "正常:5", "-o", str(out)], capsys, out)
        assert err.startswith("error: --host takes a host name or address (e.g. db.internal), not a connection "
                              "string or user:password@host"), err
        assert PASSWORD not in err


def test_server_dying_mid_scan_is_an_error_not_a_short_export(tmp_path, capsys, monkeypatch):
    """pymongo can end a broken cursor quietly; the export must fail instead of writing a partial sample."""
    proc, port = start_server(tmp_path / "db", 0, auth=False)
    try:
        load(port, DB, COLL, [{"text_cn": f"正常文本{i}", "n_labels": "正常"} for i in range(3000)])
        monkeypatch.setattr(gdl, "SCAN_BATCH", 1)  # one round trip per document
        real_rank, seen = gdl.rank_key, []

        def rank_then_kill(*a):  # the server dies after the 100th document of the scan, whatever the speed
            seen.append(1)
            if len(seen) == 100:
                proc.kill()
                proc.wait()
            return real_rank(*a)

        monkeypatch.setattr(gdl, "rank_key", rank_then_kill)
        out = tmp_path / "out" / "x.xlsx"
        out.parent.mkdir()
        err = fail(["--host", "127.0.0.1", "--port", str(port), "-l", "正常:3000", "--random", "--seed", "1",
                    "--timeout", "2", "-o", str(out)], capsys, out)
    finally:
        stop_server(proc)
    # killed between two round trips the next one cannot reach the server; killed during one, the connection is
    # lost: either way one line, exit 2, and no file (checked by fail())
    assert (f"lost the connection to MongoDB at 127.0.0.1:{port}" in err and "nothing was written" in err) or \
        f"cannot reach MongoDB at 127.0.0.1:{port}" in err, err


def test_wrong_password_in_a_subprocess(server, tmp_path):
    out = tmp_path / "x.xlsx"
    env = dict(os.environ, MONGO_PASSWORD="not-it", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "get_data_by_labels.py"), *server.argv, "-l", "正常:5",
                        "-o", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: authentication failed for user 'admin' on database 'scanadata'; check " \
                       "-u/--username, --auth-database and MONGO_PASSWORD\n"
    assert not out.exists()


def test_no_password_and_no_terminal(server, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MONGO_PASSWORD"}
    r = subprocess.run([sys.executable, str(REPO / "get_data_by_labels.py"), *server.argv, "-l", "正常:5",
                        "-o", str(tmp_path / "x.xlsx")], capture_output=True, text=True, env=env, timeout=120,
                       stdin=subprocess.DEVNULL, start_new_session=True)  # no controlling terminal to prompt on
    assert r.returncode == 2
    assert "error: no password for user 'admin': set the environment variable MONGO_PASSWORD" in r.stderr
    assert not (tmp_path / "x.xlsx").exists()


def test_rank_key_is_pinned():
    """Users rebuild old splits from their seed: the rank of a text must never change between versions.
    It is sha256("<seed>\\0<text>") (first 16 bytes), then a hash of the BSON-encoded _id for equal texts."""
    import hashlib

    assert gdl.rank_key(123, "你好", 1) == 0x04d0827317335a44ee9a7fb4c4297fbb2fe93d7561368009
    assert gdl.rank_key(123, "你好", 1) >> 64 == int(hashlib.sha256("123\0你好".encode()).hexdigest()[:32], 16)
    assert gdl.rank_key(456, "你好", 1) == 0x4a4fdb01c895f63ab18660fcb64beb832fe93d7561368009
    assert gdl.rank_key(123, "你好", ObjectId("65f000000000000000000001")) == \
        0x04d0827317335a44ee9a7fb4c4297fbb20a87ecf933894be
    assert gdl.rank_key(123, "你好", "a") == 0x04d0827317335a44ee9a7fb4c4297fbb94111931cc151f43


def _ctrl_c_as_in_a_terminal():
    """A suite started in the background by a shell (`nohup pytest ... &`) ignores SIGINT, and children inherit
    that: the demo server would never see the Ctrl-C this test sends it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_demo_server(cwd: Path, env: dict, *flags):
    """tools/demo_mongo.py running, and its output up to the line that says it serves."""
    demo = subprocess.Popen([sys.executable, str(REPO / "tools" / "demo_mongo.py"), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env,
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    lines = []
    for line in demo.stdout:
        lines.append(line)
        if line.startswith("serving until Ctrl-C"):
            break
    return demo, lines


def test_demo_server_command_works_end_to_end(tmp_path):
    """`python tools/demo_mongo.py` serves the demo data and prints a command that exports from it."""
    env = {k: v for k, v in os.environ.items() if k != "MONGO_PASSWORD"}
    env["OMP_NUM_THREADS"] = "1"
    demo, lines = start_demo_server(tmp_path, env, "--port", str(free_port()), "--storage", str(tmp_path / "db"),
                                    "--per-label", "60")
    try:
        command = next((x for x in lines if x.startswith("MONGO_PASSWORD=")), None)
        assert command, "".join(lines)
        assert "360 synthetic documents in scanadata.data_items" in lines[0]
        assignment, rest = command.split(" ", 1)
        args = shlex.split(rest)
        assert args[:2] == ["python", os.path.relpath(REPO / "get_data_by_labels.py", tmp_path)]
        env["MONGO_PASSWORD"] = assignment.split("=", 1)[1]
        r = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        df = read_table(tmp_path / "demo_train.xlsx")
        assert list(df.columns) == ["text_cn", "extracted_label", "n_labels", "source_id"]
        assert df["extracted_label"].value_counts().to_dict() == {"正常": 30, "政治安全": 12, "暴恐": 12, "歧视": 12,
                                                                   "色情低俗": 12, "违法违规": 12}
    finally:
        demo.send_signal(signal.SIGINT)
        rest_of_output = demo.communicate(timeout=60)[0]
    assert demo.returncode == 0, rest_of_output
    assert "stopping" in rest_of_output


def test_demo_server_stops_its_database_on_sigterm(tmp_path):
    """SIGTERM (kill, a CI runner's cleanup) stops the MongoDB-wire server too, and deletes its storage."""
    port = free_port()
    demo, lines = start_demo_server(tmp_path, dict(os.environ, OMP_NUM_THREADS="1"), "--port", str(port),
                                    "--per-label", "10")
    try:
        storage = Path(re.search(r"; storage (\S+)$", lines[0].strip()).group(1))
        from pymongo import MongoClient

        with MongoClient("127.0.0.1", port, serverSelectionTimeoutMS=5000) as client:
            client.admin.command("ping")  # it serves
        assert storage.exists()
        demo.send_signal(signal.SIGTERM)
        rest = demo.communicate(timeout=60)[0]
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 143 and "stopped (SIGTERM)" in rest, rest
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert not storage.parent.exists()
