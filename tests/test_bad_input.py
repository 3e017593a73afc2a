"""Bad input, case by case (the README's "Bad input" table), through the scripts as users run them.

An error case must exit 2 with ONE line on stderr, "error: <file>: <what>, <rows>; <fix>", and leave no output
(the output folder is not even created). A warning case trains, and prints "warning: ..." lines naming the
file, the rows and the counts. A property-based test checks the loader against rules stated independently.
"""
import json
import subprocess
import sys
import unicodedata

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen3_classification_direct as qcd
from lft import adapter
import test_saved_lora
import train_lora
from conftest import REPO, one_line_error, subprocess_env
from lft.common import UserError, run_cli
from lft.data import DEFAULT_LABELS, load_split
from lft.tables import OLE2_MAGIC, write_table

FAST = ("--num_epochs", "1", "--batch_size", "16", "--eval_steps", "100", "--logging_steps", "100")


@pytest.fixture(scope="module")
def frames(demo_data) -> dict:
    return {name: pd.read_excel(path, dtype=object) for name, path in demo_data.items()}


def argv(ckpt, paths: dict, out, *extra):
    return ["--checkpoint", str(ckpt), "--train_data", str(paths["train"]), "--val_data", str(paths["val"]),
            *(["--test_data", str(paths["test"])] if paths.get("test") else []), "--output_dir", str(out),
            "--max_length", "64", "--no_progress", "--device", "cpu", *extra]


# --- the cases ---------------------------------------------------------------------------------------------
# Each builder gets (folder, demo frames) and returns the files to use instead of the demo ones (train/val/test)
# and extra flags. Row numbers are what a user sees: the header is row 1 of a spreadsheet or csv.

def _xlsx(folder, name, df):
    write_table(df, folder / f"{name}.xlsx")
    return folder / f"{name}.xlsx"


def _with(df, column, rows: dict):
    df = df.copy()
    for i, v in rows.items():
        df.loc[i, column] = v
    return df


def missing_file(f, fr):
    return {"train": f / "nope.xlsx"}, ()


def empty_file(f, fr):
    (f / "train.csv").write_bytes(b"")
    return {"train": f / "train.csv"}, ()


def header_only(f, fr):
    return {"val": _xlsx(f, "val", fr["val"].iloc[:0])}, ()


def corrupt_xlsx(f, fr):
    data = (f.parent / "ok.xlsx")
    write_table(fr["train"], data)
    (f / "train.xlsx").write_bytes(data.read_bytes()[:3000])  # a zip cut short
    return {"train": f / "train.xlsx"}, ()


def not_a_workbook(f, fr):
    (f / "train.xlsx").write_text("text_cn,extracted_label\n你好,正常\n", encoding="utf-8")  # a csv renamed
    return {"train": f / "train.xlsx"}, ()


def password_protected(f, fr):
    # an encrypted .xlsx is an OLE2 compound file (EncryptionInfo + EncryptedPackage streams), not a zip
    (f / "train.xlsx").write_bytes(OLE2_MAGIC + bytes(504) + b"\0" * 4096)
    return {"train": f / "train.xlsx"}, ()


def wrong_sheet(f, fr):
    with pd.ExcelWriter(f / "train.xlsx", engine="openpyxl") as w:
        pd.DataFrame({"note": ["exported 2025-01-01"]}).to_excel(w, sheet_name="README", index=False)
        fr["train"].to_excel(w, sheet_name="data", index=False)
    return {"train": f / "train.xlsx"}, ()


def gbk_csv(f, fr):
    fr["train"].to_csv(f / "train.csv", index=False, encoding="gbk")
    return {"train": f / "train.csv"}, ()


def missing_column(f, fr):
    return {"train": _xlsx(f, "train", fr["train"].rename(columns={"extracted_label": "label"}))}, ()


def renamed_column(f, fr):
    return {"train": _xlsx(f, "train", fr["train"].rename(columns={"text_cn": " Text_CN"}))}, ()


def unknown_labels(f, fr):
    return {"train": _xlsx(f, "train", _with(fr["train"], "extracted_label", {1: "色情", 5: "色情", 9: "spam"}))}, ()


def ids_beyond_the_label_list(f, fr):
    return {"train": _xlsx(f, "train", _with(fr["train"], "extracted_label", {3: 6}))}, ()


def empty_texts(f, fr):
    return {"train": _xlsx(f, "train", _with(fr["train"], "text_cn", {2: None, 7: "   "}))}, ()


def empty_split_after_dedup(f, fr):
    return {"val": _xlsx(f, "val", fr["test"].iloc[:10]), "test": _xlsx(f, "test", fr["test"])}, ("--dedup",)


def messy_labels(f, fr):  # stray whitespace, full-width digits, Excel floats: all read as the clean label
    df = _with(fr["train"], "extracted_label", {0: " 暴恐 ", 1: "暴恐\u3000", 2: "\t正常\n"})
    df["extracted_label"] = df["extracted_label"].astype(object)
    return {"train": _xlsx(f, "train", df)}, ()


def ids_and_names_mixed(f, fr):
    df = _with(fr["train"], "extracted_label", {0: 4, 1: "４", 2: 4.0, 3: "4.0"})
    return {"train": _xlsx(f, "train", df)}, ()


def numeric_texts(f, fr):
    return {"train": _xlsx(f, "train", _with(fr["train"], "text_cn", {4: 12345, 6: 3.5}))}, ()


def over_max_length(f, fr):
    return {"train": _xlsx(f, "train", _with(fr["train"], "text_cn", {0: "很长的文本" * 40, 3: "长" * 500}))}, ()


def duplicates(f, fr):
    df = fr["train"].copy()
    df.loc[10] = df.loc[0]  # an exact repeat
    other = "正常" if df.loc[1, "extracted_label"] != "正常" else "暴恐"
    df.loc[11, ["text_cn", "extracted_label"]] = [df.loc[1, "text_cn"] + " ", other]  # a repeat, another label
    return {"train": _xlsx(f, "train", df)}, ()


def overlap(f, fr):
    train = pd.concat([fr["train"], fr["val"].iloc[:5], fr["test"].iloc[:3]], ignore_index=True)
    return {"train": _xlsx(f, "train", train)}, ()


def label_only_in_test(f, fr):
    train = fr["train"][fr["train"]["extracted_label"] != "暴恐"]
    val = fr["val"][fr["val"]["extracted_label"] != "暴恐"]
    return {"train": _xlsx(f, "train", train), "val": _xlsx(f, "val", val)}, ()


ERRORS = {  # case: (builder, substrings of the one error line)
    "missing file": (missing_file, ["nope.xlsx: file not found"]),
    "empty file (0 bytes)": (empty_file, ["train.csv: file is empty"]),
    "empty split (header only)": (header_only, ["val.xlsx: no data rows"]),
    "corrupt xlsx": (corrupt_xlsx, ["train.xlsx: cannot read as xlsx"]),
    "csv renamed to .xlsx": (not_a_workbook, ["train.xlsx: not an .xlsx workbook", "re-export it"]),
    "password-protected xlsx": (password_protected, ["train.xlsx: password-protected (encrypted) workbook",
                                                     "remove the password"]),
    "wrong sheet": (wrong_sheet, ["missing column(s) text_cn, extracted_label; found note",
                                  "only the first sheet ('README') is read, the workbook also has 'data'"]),
    "csv in GBK": (gbk_csv, ["train.csv: not UTF-8 text; re-save it as UTF-8"]),
    "missing column": (missing_column, ["train.xlsx: missing column(s) extracted_label; found text_cn, label",
                                        "--label_column"]),
    "renamed column": (renamed_column, ["missing column(s) text_cn", "'text_cn' looks like ' Text_CN'"]),
    "unknown label names": (unknown_labels, ["unknown extracted_label value(s): '色情' in row(s) 3, 7; "
                                             "'spam' in row(s) 11", "Known (from --labels): 0=正常"]),
    "label id beyond the list": (ids_beyond_the_label_list, ["'6' in row(s) 5"]),
    "empty or NaN texts": (empty_texts, ["train.xlsx: empty text_cn in 2 row(s): 4, 9; fill or delete those rows"]),
    "split emptied by --dedup": (empty_split_after_dedup, ["val.xlsx: no val rows left after --dedup"]),
    "--cuda_graphs on without a GPU": (lambda f, fr: ({}, ("--cuda_graphs", "on")),
                                       ["--cuda_graphs on needs a CUDA device, --packing on and varlen attention"]),
}

WARNINGS = {  # case: (builder, substrings that must be printed, banner line that must be printed)
    "labels with whitespace / full-width": (messy_labels, [], None),
    "label ids and names mixed": (ids_and_names_mixed, ["extracted_label mixes label ids (4 rows, e.g. row 2) and "
                                                        "names (212 rows); ids are read in --labels order"], None),
    "numeric texts": (numeric_texts, ["2 text_cn value(s) are numbers or dates, not text (rows 6, 8)"], None),
    "texts over --max_length": (over_max_length, ["2 text(s) longer than 64 tokens (up to 250) keep their first 64: "
                                                  "rows 2, 5; raise --max_length"], "train           216 texts"),
    "duplicates within a split": (duplicates, ["2 repeated text(s) in train (rows 12, 13), 1 of them with a "
                                               "different label (rows 13); kept (--dedup removes them)"], None),
    "overlap between splits": (overlap, ["5 train text(s) also in val", "rows 218, 219, 220, 221, 222; val scores "
                                         "are optimistic (--dedup removes them)", "3 train text(s) also in test"],
                               "train           224 texts"),
    "overlap, --dedup": (lambda f, fr: (overlap(f, fr)[0], ("--dedup",)),
                         ["5 train text(s) also in val", "removed from train (--dedup)"], "train           216 texts"),
    "label in test, not in train": (label_only_in_test, ["label(s) 暴恐 (", "test rows) never occur in train"], None),
}


def build(case_builder, folder, frames, demo_data):
    folder.mkdir()
    paths, extra = case_builder(folder, frames)
    return {**demo_data, **paths}, list(extra)


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_is_one_error_line_and_no_output(case, tiny_ckpt, demo_data, frames, tmp_path, capsys):
    builder, expected = ERRORS[case]
    paths, extra = build(builder, tmp_path / "data", frames, demo_data)
    out = tmp_path / "run"
    assert run_cli(train_lora.main, argv(tiny_ckpt, paths, out, *FAST, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists()


@pytest.mark.parametrize("case", WARNINGS)
def test_questionable_input_trains_with_warnings(case, tiny_ckpt, demo_data, frames, tmp_path, capsys):
    builder, expected, banner = WARNINGS[case]
    paths, extra = build(builder, tmp_path / "data", frames, demo_data)
    assert train_lora.main(argv(tiny_ckpt, paths, tmp_path / "run", *FAST, *extra)) == 0
    log = capsys.readouterr().out
    warnings = [line for line in log.splitlines() if line.startswith("warning: ")]
    for text in expected:
        assert any(text in w for w in warnings), (text, warnings)
    if not expected:
        assert warnings == []
    if banner:
        assert banner in log


def test_messy_labels_read_as_the_clean_ones(frames, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    messy = load_split(messy_labels(folder, frames)[0]["train"])
    mixed = load_split(ids_and_names_mixed(folder, frames)[0]["train"])
    assert messy.labels[:3].tolist() == [4, 4, 0] and mixed.labels[:4].tolist() == [4, 4, 4, 4]


def test_dedup_drops_from_train_only(frames, demo_data, tmp_path):
    from lft.data import check_splits

    folder = tmp_path / "d"
    folder.mkdir()
    paths = {**demo_data, **overlap(folder, frames)[0]}
    splits = {k: load_split(v) for k, v in paths.items()}
    kept, notes = check_splits(splits, DEFAULT_LABELS, dedup=True)
    assert [len(kept[k]) for k in ("train", "val", "test")] == [216, 72, 72]
    assert kept["train"].rows.tolist() == list(range(216))  # the file rows of what is left
    unchanged, _ = check_splits(splits, DEFAULT_LABELS, dedup=False)
    assert len(unchanged["train"]) == 224 and len(notes) == 2


def test_reading_in_a_second_process_gives_the_same_splits_and_errors(frames, demo_data, tmp_path):
    """train_lora.py reads large data files in processes of their own, one per file (lft.data.ReadInBackground).
    Forced on the demo files here, it gives what reading in this process gives: the same texts, labels, file rows
    and warnings (--dedup and the notes across splits included), and the same one-line error for a bad row."""
    from lft.data import ReadInBackground, read_splits

    folder = tmp_path / "d"
    folder.mkdir()
    paths = {**demo_data, **overlap(folder, frames)[0]}
    call = (paths, DEFAULT_LABELS, "text_cn", "extracted_label", True)
    here = read_splits(*call)
    with ReadInBackground(*call, min_bytes=0) as reading:
        assert reading.in_process
        there = reading.result()
    assert there[1] == here[1] and len(here[1]) == 2
    assert there[0].keys() == here[0].keys()
    for name, a in here[0].items():
        b = there[0][name]
        assert (b.path, b.texts, b.lines, b.notes) == (a.path, a.texts, a.lines, a.notes)
        assert b.labels.tolist() == a.labels.tolist() and b.rows.tolist() == a.rows.tolist()
    (tmp_path / "bad").mkdir()
    bad = {**demo_data, **unknown_labels(tmp_path / "bad", frames)[0]}
    expected = one_line_error(read_splits, bad, DEFAULT_LABELS, "text_cn", "extracted_label")
    with ReadInBackground(bad, DEFAULT_LABELS, "text_cn", "extracted_label", min_bytes=0) as reading:
        assert one_line_error(reading.result) == expected
    with ReadInBackground(paths, DEFAULT_LABELS, "text_cn", "extracted_label", min_bytes=0) as reading:
        procs = [proc for proc, _ in reading._procs.values()]
    assert len(procs) == 3 and all(proc.poll() is not None for proc in procs)  # leaving the block ended them
    odd_path = folder / "odd.jsonl"  # hostile texts; a lone surrogate (\ud800, escaped in the file) among them
    odd_path.write_text("".join(json.dumps({"text_cn": t, "extracted_label": "正常"}) + "\n"
                                for t in ("半个\ud800代理对", "=1+1", "<|endoftext|>")), encoding="utf-8")
    with ReadInBackground({"test": odd_path}, DEFAULT_LABELS, "text_cn", "extracted_label", min_bytes=0) as reading:
        assert reading.result()[0]["test"].texts == read_splits({"test": odd_path}, DEFAULT_LABELS, "text_cn",
                                                                 "extracted_label")[0]["test"].texts
    small = ReadInBackground(paths, DEFAULT_LABELS, "text_cn", "extracted_label")  # the demo's files are small:
    assert not small.in_process and small.result()[1] == read_splits(*call[:4])[1]  # read here, in result()


def test_the_data_module_imports_no_torch():
    """ReadInBackground's process imports lft.data alone; with torch it would take seconds to start."""
    code = "import sys, lft.data; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                       cwd=REPO, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


# --- as users run them: a subprocess, exit status 2, one line, no traceback ----------------------------------

CLI_CASES = ("missing file", "missing column", "unknown label names", "empty or NaN texts", "empty file (0 bytes)")


def test_cli_exit_2_with_one_line(tiny_ckpt, demo_data, frames, tmp_path):
    runs = {}
    for i, case in enumerate(CLI_CASES):  # all at once: they are independent
        builder, expected = ERRORS[case]
        paths, extra = build(builder, tmp_path / f"data{i}", frames, demo_data)
        out = tmp_path / f"run{i}"
        cmd = [sys.executable, str(REPO / "train_lora.py"), *argv(tiny_ckpt, paths, out, *FAST, *extra)]
        runs[case] = (subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True), expected, out)
    for case, (p, expected, out) in runs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 2, (case, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("error: ") and "Traceback" not in stderr, (case, stderr)
        assert all(text in stderr for text in expected), (case, stderr)
        assert not out.exists(), case


def test_exit_script_exits_with_run_clis_status_heap_frozen(monkeypatch, capsys):
    import gc

    from lft.common import exit_script

    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))  # the real one would freeze pytest's heap

    def bad(argv):
        raise UserError("a problem")
    for main, rc in ((lambda argv: None, 0), (lambda argv: 3, 3), (bad, 2)):
        with pytest.raises(SystemExit) as e:
            exit_script(main)
        assert e.value.code == rc
    assert frozen == [True] * 3 and capsys.readouterr().err == "error: a problem\n"


# --- evaluation: data labels that the adapter does not know --------------------------------------------------

def test_eval_data_with_labels_the_adapter_lacks(tiny_ckpt, demo_data, tmp_path, capsys):
    model, identity = qcd.build_classifier(tiny_ckpt, ("neg", "pos"), lora=dict(r=4, alpha=8, dropout=0.0))
    folder = tmp_path / "adapter"
    adapter.save_adapter(model, folder, {"labels": ["neg", "pos"], "max_length": 64, "base": identity, "args": {}})
    rc = run_cli(test_saved_lora.main, ["--checkpoint", str(tiny_ckpt), "--lora_model", str(folder),
                                        "--test_data", str(demo_data["test"]), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "test.xlsx: unknown extracted_label value(s): '" in err and "'违法违规' in row(s) " in err
    assert f"Known (from the adapter {folder / 'classifier_config.json'}): 0=neg, 1=pos" in err
    assert not (folder / "eval").exists() and not (tmp_path / "adapter_eval").exists()


# --- property: the loader against independently stated rules ------------------------------------------------

LABELS = ("正常", "歧视", "暴恐")
SPACE = st.sampled_from([" ", "\t", "\u3000", "\xa0", "\n", ""])
FULL = str.maketrans("0123456789.", "０１２３４５６７８９．")


@st.composite
def label_cell(draw, fmt):
    """(cell value, the label id a reader must get, or None: must be reported as unknown)."""
    i = draw(st.integers(0, len(LABELS) - 1))
    kind = draw(st.sampled_from(["name", "id", "id text", "unknown", "id too big", "blank"]))
    pad = draw(SPACE), draw(SPACE)
    if kind == "name":
        return pad[0] + LABELS[i] + pad[1], i
    if kind == "id":
        return (draw(st.sampled_from([i, float(i)])) if fmt == "jsonl" else str(i)), i
    if kind == "id text":
        text = draw(st.sampled_from([str(i), f"{i}.0"]))
        return pad[0] + (text.translate(FULL) if draw(st.booleans()) else text) + pad[1], i
    if kind == "unknown":
        return "x" + draw(st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=5)), None
    if kind == "id too big":
        return str(len(LABELS) + draw(st.integers(0, 99))), None
    return None, None


@st.composite
def text_cell(draw, fmt):
    """(cell value, the text a reader must get, or None: must be reported as empty)."""
    kind = draw(st.sampled_from(["text", "text", "number", "blank"]))
    if kind == "text":
        t = draw(st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))
                         | st.sampled_from("\n\t\x01\u200b\u200c\u200d\ufeff\u2028"), min_size=1, max_size=20))
        visible = any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf", "Zs", "Zl", "Zp") for c in t)
        return (t, t) if visible else (t, None)  # only spaces and invisible characters: empty
    if kind == "number":
        n = draw(st.integers(-10**6, 10**6))
        return (n if fmt == "jsonl" else str(n)), str(n)
    return draw(st.sampled_from([None, "", " ", "\u3000"])), None


@st.composite
def table_rows(draw):
    fmt = draw(st.sampled_from(["csv", "jsonl"]))
    n = draw(st.integers(1, 12))
    return fmt, [(draw(text_cell(fmt)), draw(label_cell(fmt))) for _ in range(n)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table_rows())
def test_loader_property(tmp_path, case):
    fmt, rows = case
    path = tmp_path / f"t.{fmt}"
    df = pd.DataFrame({"text_cn": [t for (t, _), _ in rows], "extracted_label": [v for _, (v, _) in rows]},
                      dtype=object)
    if fmt == "csv":
        df.to_csv(path, index=False, encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"text_cn": t, "extracted_label": v}, ensure_ascii=False) + "\n"
                                for (t, _), (v, _) in rows), encoding="utf-8")
    # a row with no value at all is skipped, like a blank line; the others keep their line in the file
    # (a quoted text or label with a line break takes more than one line of a csv)
    skipped = [t in (None, "") and v is None for (t, _), (v, _) in rows]
    line, lines = (2, []) if fmt == "csv" else (1, [])
    for (t, _), (v, _) in rows:
        lines.append(line)
        line += 1 + (f"{t}".count("\n") + f"{v}".count("\n") if fmt == "csv" else 0)
    kept = [i for i in range(len(rows)) if not skipped[i]]
    shown = lines.__getitem__  # the row a user finds
    empty = [i for i in kept if rows[i][0][1] is None]
    unknown = [i for i in kept if rows[i][1][1] is None]
    try:
        split = load_split(path, LABELS)
    except UserError as e:
        msg = str(e)
        assert msg.startswith(f"{path}: ") and "\n" not in msg
        if not kept:
            assert "no data rows" in msg
        elif empty:
            assert f"empty text_cn in {len(empty)} row(s): " in msg
            listed = msg.split("row(s): ")[1].split(";")[0]
            assert listed.split(" and ")[0] == ", ".join(str(shown(i)) for i in empty[:8])
        else:
            assert unknown and "unknown extracted_label value(s)" in msg
            assert all(f" {shown(i)}" in msg for i in unknown[:8]), msg
        return
    assert kept and not empty and not unknown, "bad rows were accepted"
    assert split.texts == [rows[i][0][1] for i in kept]
    assert split.labels.tolist() == [rows[i][1][1] for i in kept]
    assert split.rows.tolist() == list(range(len(kept)))
    assert split.where(range(len(kept))).split(" and ")[0] == ", ".join(str(shown(i)) for i in kept[:8])


# --- missing is missing, invisible is empty, rows are the file's lines ---------------------------------------

def _load_error(path) -> str:
    return one_line_error(load_split, path)


def test_missing_texts_in_parquet_are_empty_not_the_text_NA(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"  # pandas' NA in a string column was read as the text "<NA>"
    pq.write_table(pa.table({"text_cn": pa.array(["好的", None, "坏的"], pa.string()),
                             "extracted_label": ["正常", "正常", "暴恐"]}), path)
    assert _load_error(path) == f"{path}: empty text_cn in 1 row(s): 2; fill or delete those rows"
    df = pd.DataFrame({"text_cn": pd.array(["好的", pd.NA, "x"], dtype="string"), "extracted_label": ["正常"] * 3})
    df.to_parquet(path)
    assert _load_error(path) == f"{path}: empty text_cn in 1 row(s): 2; fill or delete those rows"


def test_texts_of_only_invisible_characters_are_empty(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [("好的", "正常"), ("\u200b\u200c", "正常"), ("\x01", "暴恐"), ("\ufeff \u2028", "正常"), ("a\u200b", "正常")]
    path.write_text("".join(json.dumps({"text_cn": t, "extracted_label": v}) + "\n" for t, v in rows),
                    encoding="utf-8")
    assert _load_error(path) == f"{path}: empty text_cn in 3 row(s): 2, 3, 4; fill or delete those rows (3 of them " \
                                "hold only invisible characters, e.g. '\\u200b\\u200c')"


def test_csv_errors_and_warnings_name_the_file_lines(tmp_path):
    """Blank lines and multi-line texts: the rows named are the lines an editor shows."""
    path = tmp_path / "t.csv"
    path.write_text('text_cn,extracted_label\n\n好的,正常\n"两行\n文本",正常\n\n坏的,色情\n123,暴恐\n', encoding="utf-8")
    assert _load_error(path).startswith(f"{path}: unknown extracted_label value(s): '色情' in row(s) 7. ")
    path.write_text('text_cn,extracted_label\n\n好的,正常\n"两行\n文本",正常\n\n123,暴恐\n', encoding="utf-8")
    split = load_split(path)
    assert split.texts == ["好的", "两行\n文本", "123"] and split.where([0, 1, 2]) == "3, 4, 7"
    path = tmp_path / "t.jsonl"
    path.write_text('\n{"text_cn": "好的", "extracted_label": "正常"}\n\n{"text_cn": 123, "extracted_label": "暴恐"}\n',
                    encoding="utf-8")
    assert load_split(path).notes == [f"{path}: 1 text_cn value(s) are numbers or dates, not text (rows 4); they "
                                      "are used as written, e.g. '123'"]
