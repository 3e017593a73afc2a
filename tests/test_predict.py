"""predict.py and the Classifier API on the tiny checkpoint, with an adapter trained once here on the demo data.

Files: every format round trip (columns, order and values kept; probabilities those of the API), stdin/stdout,
--id_column, the threshold rule, bad input (one line, exit 2, nothing written), chunked == unchunked.
MongoDB (a real SecantusDB server with auth, the exporter tests' fixture): write-back values, other fields
untouched, kill -9 mid-run then resume == uninterrupted, idempotence, auth failure, documents without text.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

import predict
import test_saved_lora
import train_lora
from conftest import REPO, subprocess_env
from lft.common import run_cli
from lft.predict import Classifier
from lft.tables import read_table
from test_get_data_by_labels import DB, PASSWORD, USER, server  # noqa: F401  (the MongoDB fixture)
from test_train import base_args

LABELS = ["正常", "歧视", "违法违规", "政治安全", "暴恐", "色情低俗"]
P_COLS = [f"p_{n}" for n in LABELS]


@pytest.fixture(scope="module")
def model(tiny_ckpt, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict_model") / "run"
    assert train_lora.main(base_args(tiny_ckpt, demo_data, out, "--num_epochs", "1")) == 0
    return out / "best_model"


@pytest.fixture(scope="module")
def clf(model):
    return Classifier.load(model, device="cpu")


@pytest.fixture(scope="module")
def table(demo_data):
    """The demo test split, shuffled, with an id column and a numeric column."""
    df = read_table(demo_data["test"]).sample(frac=1.0, random_state=3).reset_index(drop=True)
    df.insert(0, "note", [f"n{i}" for i in range(len(df))])
    df["row_id"] = [f"id-{i:03d}" for i in range(len(df))]
    df["n"] = np.arange(len(df)) * 3
    return df


def write_input(df, path):
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_excel(path, index=False)
    return path


def run(model, *flags) -> int:
    return predict.main(["--lora_model", str(model), "--device", "cpu", "--no_progress", *map(str, flags)])


def fail(capsys, model, *flags) -> str:
    capsys.readouterr()
    assert run_cli(predict.main, ["--lora_model", str(model), "--device", "cpu", "--no_progress",
                                  *map(str, flags)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


# --- the API ------------------------------------------------------------------------------------------------

def test_api_probabilities_equal_test_saved_lora(model, clf, demo_data, tmp_path):
    out = tmp_path / "eval"
    assert test_saved_lora.main(["--lora_model", str(model), "--test_data", str(demo_data["test"]), "--output_dir",
                                 str(out), "--predictions_format", "csv", "--device", "cpu", "--no_progress"]) == 0
    ev = pd.read_csv(out / "predictions.csv")
    P = clf.predict_proba(list(ev["text"]))
    assert P.shape == (len(ev), 6) and clf.labels == LABELS
    np.testing.assert_allclose(P, ev[P_COLS].to_numpy(), atol=1e-6, rtol=0)
    preds = clf.predict(list(ev["text"][:5]))
    assert [p.label for p in preds] == list(ev["predicted"][:5])
    assert [p.score for p in preds] == pytest.approx(P[np.arange(5), P[:5].argmax(1)].tolist(), abs=1e-7)


def test_test_saved_lora_reports_do_not_depend_on_their_warm_up(model, demo_data, tmp_path, monkeypatch):
    """The reports' imports run in a thread during the evaluation (lft.metrics.warm_up). If that fails, nothing is
    lost: the script goes on, and the imports run again where the reports need them."""
    from lft import metrics

    def broken(table_format=None):
        raise ImportError("no matplotlib here")
    monkeypatch.setattr(metrics, "warm_up", broken)
    out = tmp_path / "eval"
    assert test_saved_lora.main(["--lora_model", str(model), "--test_data", str(demo_data["test"]), "--output_dir",
                                 str(out), "--predictions_format", "csv", "--device", "cpu", "--no_progress"]) == 0
    assert {p.name for p in out.iterdir()} == {"test_results.json", "confusion_matrix.png", "predictions.csv"}


# --- files --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", ".xlsx"])
def test_round_trip_every_format(model, clf, table, tmp_path, suffix, capsys):
    src = write_input(table, tmp_path / f"in{suffix}")
    out = tmp_path / f"out{suffix}"
    assert run(model, "--input", src, "--output", out) == 0
    got = read_table(out)
    assert list(got.columns) == list(table.columns) + ["label", "score"] + P_COLS
    for c in table.columns:  # values and order of the input, the label column copied through
        assert [str(v) for v in got[c]] == [str(v) for v in table[c]], c
    P = clf.predict_proba(list(table["text_cn"]))
    np.testing.assert_allclose(got[P_COLS].to_numpy(float), P, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[P_COLS].to_numpy(float).sum(1), 1.0, atol=1e-5)
    assert list(got["label"]) == [LABELS[k] for k in P.argmax(1)]
    assert got["score"].to_numpy(float) == pytest.approx(P.max(1), abs=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name])  # no temp file left
    summary = capsys.readouterr().out
    assert f"{len(table)} texts in" in summary and f"wrote {len(table)} rows to {out}" in summary


def test_id_column_goes_first(model, table, tmp_path):
    src = write_input(table, tmp_path / "in.parquet")
    assert run(model, "--input", src, "--output", tmp_path / "out.parquet", "--id_column", "row_id") == 0
    got = pd.read_parquet(tmp_path / "out.parquet")
    assert list(got.columns[:4]) == ["row_id", "note", "text_cn", "extracted_label"]
    assert list(got["row_id"]) == list(table["row_id"]) and got["n"].dtype == table["n"].dtype


def test_stdin_to_stdout(model, clf, table, monkeypatch, capsys):
    lines = [json.dumps({"id": i, "text_cn": t, "meta": {"k": [1, 2]}}, ensure_ascii=False)
             for i, t in enumerate(table["text_cn"][:10])]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    capsys.readouterr()
    assert run(model, "--input", "-", "--output", "-") == 0
    cap = capsys.readouterr()
    rows = [json.loads(x) for x in cap.out.splitlines()]  # stdout holds the data only; the summary is on stderr
    assert [r["id"] for r in rows] == list(range(10)) and all(r["meta"] == {"k": [1, 2]} for r in rows)
    assert list(rows[0])[:3] == ["id", "text_cn", "meta"]
    P = clf.predict_proba(list(table["text_cn"][:10]))
    np.testing.assert_allclose([[r[c] for c in P_COLS] for r in rows], P, atol=1e-6, rtol=0)
    assert "10 texts in" in cap.err


def test_threshold_changes_the_label_by_the_rule(model, clf, table, tmp_path):
    P = clf.predict_proba(list(table["text_cn"]))
    # the row whose probability for 暴恐 (4) is highest among rows that do not pick it: its threshold flips it
    others = np.flatnonzero(P.argmax(1) != 4)
    row = others[P[others, 4].argmax()]
    t = float(np.floor(P[row, 4] * 1e4) / 1e4)
    expected = [LABELS[4] if p[4] >= t else LABELS[p.argmax()] for p in P]
    assert expected[row] == "暴恐" != LABELS[P[row].argmax()]
    src = write_input(table, tmp_path / "in.csv")
    assert run(model, "--input", src, "--output", tmp_path / "out.csv", "--threshold", f"暴恐:{t}") == 0
    got = pd.read_csv(tmp_path / "out.csv")
    assert list(got["label"]) == expected
    assert got["score"][row] == pytest.approx(P[row, 4], abs=1e-6)  # the score is the chosen label's


def test_bad_input_is_one_line_and_writes_nothing(model, table, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    src = write_input(table, folder / "in.csv")
    out = tmp_path / "out" / "out.csv"
    out.parent.mkdir()
    err = fail(capsys, model, "--input", src, "--output", out, "--text_column", "text")
    assert "missing column(s) text (--text_column); found note, text_cn" in err
    err = fail(capsys, model, "--input", src, "--output", out, "--id_column", "nosuch")
    assert "missing column(s) nosuch (--id_column)" in err
    bad = table.copy()
    bad.loc[[1, 3], "text_cn"] = ["", "   "]
    bad.loc[5, "text_cn"] = None
    write_input(bad, folder / "bad.csv")
    err = fail(capsys, model, "--input", folder / "bad.csv", "--output", out)
    assert "empty or missing text_cn in 3 row(s): 3, 5, 7; fill or delete them, or pass --skip_bad_rows" in err
    err = fail(capsys, model, "--input", src, "--output", out, "--threshold", "暴力:0.3")
    assert "--threshold '暴力:0.3'" in err and "bad: '暴力:0.3'" in err
    err = fail(capsys, model, "--input", src, "--output", src)
    assert "--output must not be --input" in err
    err = fail(capsys, model, "--input", src, "--output", tmp_path / "out" / "x.jsonl", "--query", "[1]")
    assert "must have the input's format (.csv)" in err and "--query apply to MongoDB mode" in err
    assert list(out.parent.iterdir()) == [] and sorted(p.name for p in folder.iterdir()) == ["bad.csv", "in.csv"]
    out.write_text("keep me")
    err = fail(capsys, model, "--input", src, "--output", out)
    assert f"--output {out} exists; pass --overwrite to replace it" in err and out.read_text() == "keep me"
    # --skip_bad_rows: the bad rows are written with an empty label and counted
    assert run(model, "--input", folder / "bad.csv", "--output", out, "--overwrite", "--skip_bad_rows") == 0
    got = pd.read_csv(out)
    assert len(got) == len(table) and got["label"].isna().tolist() == [i in (1, 3, 5) for i in range(len(table))]
    assert "skipped (no text)      3" in capsys.readouterr().out


def test_the_job_size_from_the_scan_reaches_the_small_job_rule(model, tmp_path, monkeypatch, capsys):
    """predict.py counts the texts' characters (each up to max_length: about the tokens the model reads) while it
    scans the file, and hands them to Classifier.load, whose small-job rule (lft.runtime.for_job) turns compiling
    off on a GPU for a job too small to pay for it; stdin's size is unknown: none is given."""
    from lft import runtime as R

    texts = ["短" * 10, "长" * 500, "中" * 30]
    src = tmp_path / "three.csv"
    pd.DataFrame({"text_cn": texts}).to_csv(src, index=False)
    seen = []

    def for_job(rt, args, tokens, kind):
        seen.append((tokens, kind))
        return rt, f"small {kind} job ({tokens:,} tokens): compile off (test)"
    monkeypatch.setattr(R, "for_job", for_job)
    capsys.readouterr()
    assert run(model, "--input", src, "--output", tmp_path / "o.csv") == 0
    assert seen == [(10 + 64 + 30, "evaluation")]  # the adapter's max_length is 64
    assert "note: small evaluation job (104 tokens): compile off (test)" in capsys.readouterr().out
    seen.clear()
    assert run(model, "--input", src, "--output", tmp_path / "o2.csv", "--max_length", 20) == 0
    assert seen == [(10 + 20 + 20, "evaluation")]
    seen.clear()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO('{"text_cn": "好"}\n'.encode())))
    assert run(model, "--input", "-", "--output", "-") == 0
    assert seen == []


def test_chunked_streaming_equals_one_chunk(model, tmp_path, monkeypatch):
    texts = [f"第{i}条短消息{'好坏'[i % 2]}" for i in range(20_000)]
    src = tmp_path / "big.csv"
    pd.DataFrame({"k": range(len(texts)), "text_cn": texts}).to_csv(src, index=False)
    sizes = []
    real = Classifier.proba_of_ids
    monkeypatch.setattr(Classifier, "proba_of_ids", lambda self, ids: (sizes.append(len(ids)), real(self, ids))[1])
    assert run(model, "--input", src, "--output", tmp_path / "a.csv", "--chunk_size", 1500) == 0
    assert sizes == [1500] * 13 + [500]  # never more than one chunk of texts in memory
    sizes.clear()
    assert run(model, "--input", src, "--output", tmp_path / "b.csv", "--chunk_size", 20_000) == 0
    assert sizes == [20_000]
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert list(a["k"]) == list(range(20_000)) and list(a["label"]) == list(b["label"])
    np.testing.assert_allclose(a[P_COLS].to_numpy(), b[P_COLS].to_numpy(), atol=2e-6, rtol=0)


# --- MongoDB ------------------------------------------------------------------------------------------------

N_GOOD = 240


@pytest.fixture(scope="module")
def mongo_docs(server):  # noqa: F811
    """N_GOOD documents with text and every document of the fixture without a usable text."""
    good = [d for d in server.docs if isinstance(d.get("text_cn"), str) and d["text_cn"].strip()][:N_GOOD]
    bad = [d for d in server.docs if not (isinstance(d.get("text_cn"), str) and d["text_cn"].strip())]
    return good + bad


def client_for(server):  # noqa: F811
    from pymongo import MongoClient

    return MongoClient("127.0.0.1", server.port, username=USER, password=PASSWORD, authSource=DB)


def fresh_collection(server, docs, name):  # noqa: F811
    with client_for(server) as c:
        c[DB].drop_collection(name)
        c[DB][name].insert_many([dict(d) for d in docs])


def mongo_run(server, model, name, *flags) -> int:  # noqa: F811
    return run(model, *server.conn, "--db", DB, "--collection", name, "--write_field", "prediction",
               *map(str, flags))


def stored(server, name):  # noqa: F811
    with client_for(server) as c:
        return {d["_id"]: d for d in c[DB][name].find()}


def test_mongo_write_back_other_fields_untouched_and_idempotent(server, model, clf, mongo_docs, monkeypatch,  # noqa: F811
                                                                capsys):
    monkeypatch.setenv("MONGO_PASSWORD", PASSWORD)
    fresh_collection(server, mongo_docs, "predict_a")
    n_bad = len(mongo_docs) - N_GOOD
    # a --query first: only the documents it selects
    assert mongo_run(server, model, "predict_a", "--query", '{"source_id": {"$lt": 100}}', "--chunk_size", 64) == 0
    first = sum(1 for d in mongo_docs[:N_GOOD] if d["source_id"] < 100)
    assert f"classified {first}, already done 0, bad 0" in capsys.readouterr().out
    assert mongo_run(server, model, "predict_a", "--chunk_size", 64) == 0
    assert f"classified {N_GOOD - first}, already done {first}, bad {n_bad} (e.g. _id" in capsys.readouterr().out
    docs = stored(server, "predict_a")
    P = clf.predict_proba([d["text_cn"] for d in mongo_docs[:N_GOOD]])
    for d, p in zip(mongo_docs, P):
        got = dict(docs[d["_id"]])
        pred = got.pop("prediction")
        assert got == d  # every other field as it was
        assert set(pred) == {"label", "score", "probs", "model", "at"} and pred["model"] == clf.identity
        assert list(pred["probs"]) == LABELS and pred["label"] == LABELS[p.argmax()]
        assert [pred["probs"][n] for n in LABELS] == pytest.approx(p.tolist(), abs=1e-6)
        assert pred["score"] == pred["probs"][pred["label"]] and isinstance(pred["at"], datetime)
    for d in mongo_docs[N_GOOD:]:  # no text: left untouched
        assert docs[d["_id"]] == d
    # a second run changes nothing
    assert mongo_run(server, model, "predict_a") == 0
    assert f"classified 0, already done {N_GOOD}, bad {n_bad}" in capsys.readouterr().out
    assert stored(server, "predict_a") == docs


def test_mongo_kill_9_then_resume_labels_each_document_once(server, model, mongo_docs, tmp_path, monkeypatch,  # noqa: F811
                                                            capsys):
    monkeypatch.setenv("MONGO_PASSWORD", PASSWORD)
    docs = mongo_docs[:N_GOOD]
    for name in ("predict_full", "predict_cut"):
        fresh_collection(server, docs, name)
    assert mongo_run(server, model, "predict_full", "--chunk_size", 50) == 0  # uninterrupted
    proc = subprocess.Popen([sys.executable, str(REPO / "predict.py"), "--lora_model", str(model), "--device", "cpu",
                             "--no_progress", *server.conn, "--db", DB, "--collection", "predict_cut",
                             "--write_field", "prediction", "--chunk_size", "4"],
                            env=dict(subprocess_env(), MONGO_PASSWORD=PASSWORD), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        with client_for(server) as c:
            coll, deadline = c[DB]["predict_cut"], time.time() + 120
            while coll.count_documents({"prediction": {"$exists": True}}) < 40 and proc.poll() is None:
                assert time.time() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    before = {k: d["prediction"] for k, d in stored(server, "predict_cut").items() if "prediction" in d}
    assert 40 <= len(before) < N_GOOD, len(before)
    capsys.readouterr()
    assert mongo_run(server, model, "predict_cut") == 0
    assert f"classified {N_GOOD - len(before)}, already done {len(before)}, bad 0" in capsys.readouterr().out
    cut, full = stored(server, "predict_cut"), stored(server, "predict_full")
    for k, pred in before.items():  # labelled exactly once: the first run's predictions were not rewritten
        assert cut[k]["prediction"] == pred
    assert {k: d["prediction"]["label"] for k, d in cut.items()} == \
        {k: d["prediction"]["label"] for k, d in full.items()}


def test_mongo_errors(server, model, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("MONGO_PASSWORD", "not-it")
    err = fail(capsys, model, *server.conn, "--db", DB, "--collection", "data_items", "--write_field", "prediction")
    assert err == "error: authentication failed for user 'admin' on database 'scanadata'; check -u/--username, " \
                  "--auth-database and MONGO_PASSWORD\n"
    err = fail(capsys, model, *server.conn, "--write_field", "text_cn", "--query", '["a"]')
    assert "--query must be a JSON object" in err and "--write_field text_cn would overwrite the text field" in err
    err = fail(capsys, model, "--uri", f"mongodb://{USER}:{PASSWORD}@127.0.0.1:{server.port}/",
               "--write_field", "prediction")
    assert "--uri must not carry credentials" in err and PASSWORD not in err


def test_a_compiled_classifier_compiles_while_loading(model, tmp_path, monkeypatch, capsys):
    """With compile on, Classifier.load ends by running one row of placeholder tokens through the compiled layers
    (a large row: over SMALL_ROW_TOKENS, texts of at most max_length), so compiling counts as loading, as a
    server's warm-up does, and predict.py's load line says how long it took. Compiling itself is the GPU's
    (inductor on CPU takes ~40 s): here torch.compile is replaced by a no-op that leaves the forward counted."""
    import qwen3_classification_direct as qcd
    from lft import data as D
    from lft import predict as P

    rows = []
    monkeypatch.setattr(qcd, "compile_decoder_layers", lambda net: rows.clear())
    plain = P.Predictor._row

    def row(self, seqs):
        rows.append([len(s) for s in seqs])
        return plain(self, seqs)
    monkeypatch.setattr(P.Predictor, "_row", row)
    clf = Classifier.load(model, device="cpu", args=P.runtime_args("cpu", compile="on"))
    assert clf.runtime.compile and clf.compile_seconds > 0
    assert len(rows) == 1 and max(rows[0]) <= clf.max_length
    assert D.SMALL_ROW_TOKENS < sum(rows[0]) <= P.COMPILE_ROW_TOKENS
    assert Classifier.load(model, device="cpu").compile_seconds == 0  # compile off (auto on CPU): no extra row
    src = tmp_path / "in.csv"
    pd.DataFrame({"text_cn": ["好"]}).to_csv(src, index=False)
    capsys.readouterr()
    assert run(model, "--input", src, "--output", tmp_path / "o.csv", "--compile", "on") == 0
    assert re.search(r"loaded in [\d.]+ s \(compiling [\d.]+ s\)", capsys.readouterr().out)
