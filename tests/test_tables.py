"""lft.tables: every text survives write -> read unchanged in every format; hostile files are one-line errors.

No torch here: these run in seconds.
"""
from __future__ import annotations

import time
import zipfile

import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lft.common import UserError
from lft.tables import read_table, read_table_rows, write_table
from conftest import one_line_error

FORMATS = ("xlsx", "csv", "jsonl", "parquet")
# texts that each broke a round trip once: formulas, NA spellings, control characters, Excel's own escapes
SPECIAL = ["=1+1", "=HYPERLINK(\"http://x\",\"y\")", "+1", "-1", "@SUM(A1)", "NA", "N/A", "#N/A", "None", "null",
           "nan", "NaN", "NULL", "-nan", "1.0", "0", "TRUE", " 两边有空格 ", "\t制表\t", "行1\n行2", "行1\r\n行2", "\r",
           "a\x00b", "\x01", "\x07铃", "\x0b\x0c\x1f", "_x0041_", "_x005F_x0041_", "_x000D_", "\u200b\u200c", "\ufeff",
           "\ufffe\uffff", "😀𠀋", "a,\"b\",c", "\"", "'quoted'", "1,正常\n2,暴恐"]
texts = st.text(min_size=1, max_size=30) | st.sampled_from(SPECIAL)


def roundtrip(fmt: str, values: list, tmp_path) -> list:
    path = tmp_path / f"t.{fmt}"
    write_table(pd.DataFrame({"text_cn": values, "n": list(range(len(values)))}), path)
    df = read_table(path)
    assert list(df.columns) == ["text_cn", "n"]
    assert [int(x) for x in df["n"]] == list(range(len(values)))
    return df["text_cn"].tolist()


@pytest.mark.parametrize("fmt", FORMATS)
def test_special_texts_round_trip_unchanged(fmt, tmp_path):
    assert roundtrip(fmt, SPECIAL, tmp_path) == SPECIAL


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_is_none_in_every_format(fmt, tmp_path):
    df = pd.DataFrame({"text_cn": pd.array(["a", None, pd.NA, "", "b"], dtype=object),
                       "x": [1.5, float("nan"), None, pd.NA, pd.NaT], "n": range(5)}, dtype=object)
    write_table(df, tmp_path / f"t.{fmt}")
    back = read_table(tmp_path / f"t.{fmt}")
    assert back["text_cn"].tolist() == ["a", None, None, None, "b"]
    assert back["x"].tolist() == [1.5 if fmt != "csv" else "1.5", None, None, None, None]


def test_xlsx_formula_text_is_a_string_cell(tmp_path):
    import openpyxl

    write_table(pd.DataFrame({"text_cn": ["=1+1", "=cmd|' /C calc'!A0"]}), tmp_path / "t.xlsx")
    ws = openpyxl.load_workbook(tmp_path / "t.xlsx").active
    assert [(c.value, c.data_type) for c in ws["A"][1:]] == [("=1+1", "s"), ("=cmd|' /C calc'!A0", "s")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(FORMATS), values=st.lists(texts, min_size=1, max_size=8))
@example(fmt="xlsx", values=["_x0007_\x07"])
def test_property_any_text_round_trips_unchanged(tmp_path, fmt, values):
    assert roundtrip(fmt, values, tmp_path) == values


# --- csv: quotes, blank lines, line numbers -------------------------------------------------------------------

def csv_file(tmp_path, *lines) -> str:
    path = tmp_path / "t.csv"
    path.write_text("\n".join(("text_cn,extracted_label",) + lines) + "\n", encoding="utf-8")
    return path


def error(path) -> str:
    return one_line_error(read_table, path)


def test_csv_stray_quote_is_an_error_naming_its_line(tmp_path):
    # pandas read this as 'quoted b': the quotes vanished without a word
    path = csv_file(tmp_path, "好的,正常", '"quoted" b,正常', "第三,暴恐")
    assert error(path).startswith(f"{path}: line 3: a quote (\") closes a quoted text and more text follows it")


def test_csv_unclosed_quote_that_swallows_rows_is_an_error(tmp_path):
    # pandas read 3 rows, the first holding 4 lines of the file: rows 4-5 silently merged into it
    path = csv_file(tmp_path, "好的,正常", '"他说,正常', "第三行,暴恐", "第四行,正常", '第五行",歧视', "第六,正常")
    msg = error(path)
    assert msg.startswith(f"{path}: line 3: a quoted text runs over several lines and takes in what looks like "
                          "a whole row ('第四行,正常'): an unescaped quote"), msg
    path = csv_file(tmp_path, "好的,正常", '"他说,正常', "第三行,暴恐")  # never closed
    assert error(path).startswith(f"{path}: line 3: a quoted text starting on this line never ends")


def test_csv_multi_line_texts_are_not_mistaken_for_merged_rows(tmp_path):
    path = csv_file(tmp_path, '"第一行\n第二行, 含逗号",正常', "好的,暴恐", '"a\n""b"",c",歧视')
    df, where = read_table_rows(path)
    assert df.values.tolist() == [["第一行\n第二行, 含逗号", "正常"], ["好的", "暴恐"], ['a\n"b",c', "歧视"]]
    assert where == [2, 4, 5]


def test_csv_too_many_fields_names_the_line(tmp_path):
    path = csv_file(tmp_path, "好的,正常", "", "a,b,正常")
    assert error(path) == f"{path}: line 4 has 3 fields but the header has 2; a text with a comma must be quoted " \
                          '("...")'


def test_blank_lines_and_empty_rows_keep_file_line_numbers(tmp_path):
    path = csv_file(tmp_path, "", "好的,正常", "", "", ",", "坏的,暴恐", "")
    df, where = read_table_rows(path)
    assert df.values.tolist() == [["好的", "正常"], ["坏的", "暴恐"]] and where == [3, 7]
    path = tmp_path / "t.jsonl"
    path.write_text('\n{"text_cn": "a"}\n\n{"text_cn": null}\n{"text_cn": "b", "x": 1}\n', encoding="utf-8")
    df, where = read_table_rows(path)
    assert df.values.tolist() == [["a", None], ["b", 1]] and where == [2, 5]


# --- duplicate headers: which column was meant? ---------------------------------------------------------------

def test_duplicate_column_is_an_error_in_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.csv"
    path.write_text("text_cn,extracted_label,text_cn\na,正常,b\n", encoding="utf-8")
    assert error(path) == f"{path}: column 'text_cn' appears 2 times in the header (columns 1, 3); rename or " \
                          "delete the extra one(s), so it is clear which one is meant"
    path = tmp_path / "t.xlsx"
    import openpyxl

    wb = openpyxl.Workbook()
    wb.active.append(["text_cn", "extracted_label", "text_cn"])
    wb.active.append(["a", "正常", "b"])
    wb.save(path)
    assert "column 'text_cn' appears 2 times in the header (columns A, C)" in error(path)
    path = tmp_path / "t.jsonl"
    path.write_text('{"text_cn": "a", "text_cn": "b"}\n', encoding="utf-8")
    assert error(path).startswith(f"{path}: line 1: not a JSON object (the key 'text_cn' appears twice")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table([pa.array(["a"]), pa.array(["b"])], names=["text_cn", "text_cn"]), path)
    assert "column 'text_cn' appears 2 times in the header (columns 1, 2)" in error(path)
    with pytest.raises(UserError, match="column\\(s\\) text_cn appear twice"):
        write_table(pd.DataFrame([["a", "b"]], columns=["text_cn", "text_cn"]), tmp_path / "w.csv")
    assert not (tmp_path / "w.csv").exists()


# --- hostile workbooks: bounded by the data, not by what the file claims -------------------------------------

def _patch_sheet(src, dst, extra_rows: str, dimension: str | None = None, pad: int = 0) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml":
                xml = data.decode()
                if dimension:
                    xml = xml.replace("<sheetData>", f'<dimension ref="{dimension}"/><sheetData>', 1)
                xml = xml.replace("</sheetData>", extra_rows + "</sheetData>" + " " * pad)
                data = xml.encode()
            zout.writestr(item, data)


def test_xlsx_error_cells_are_missing_but_the_text_NA_is_text(tmp_path):
    write_table(pd.DataFrame({"text_cn": ["#N/A"], "n": [1]}), tmp_path / "ok.xlsx")
    path = tmp_path / "t.xlsx"
    _patch_sheet(tmp_path / "ok.xlsx", path, '<row r="3"><c r="A3" t="e"><v>#N/A</v></c><c r="B3"><v>2</v></c></row>')
    df, where = read_table_rows(path)
    assert df.values.tolist() == [["#N/A", 1], [None, 2]] and where == [2, 3]


BOMB = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a dense 1M x 16k grid cannot fit
from lft.common import UserError
from lft.tables import read_table_rows
t = time.time()
try:
    df, where = read_table_rows(sys.argv[1])
    print("rows", df.values.tolist(), where)
except UserError as e:
    print("error", e)
print(f"seconds {time.time() - t:.1f}")
"""


@pytest.mark.parametrize("cell, expected", [
    ('<c r="XFD1048576" t="inlineStr"><is><t>x</t></is></c>',
     "error {path}: cell XFD1048576 is beyond column SR (a table has at most 512 columns); delete it or move the data"),
    ('<c r="A1048576" t="inlineStr"><is><t>far</t></is></c>', "rows [['a'], ['far']] [2, 1048576]"),
])
def test_xlsx_claiming_the_whole_sheet_reads_fast_in_bounded_memory(tmp_path, cell, expected):
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    write_table(pd.DataFrame({"text_cn": ["a"]}), tmp_path / "ok.xlsx")
    path = tmp_path / "bomb.xlsx"
    _patch_sheet(tmp_path / "ok.xlsx", path, f'<row r="1048576">{cell}</row>', "A1:XFD1048576")
    assert path.stat().st_size < 10_000
    r = subprocess.run([sys.executable, "-c", BOMB, str(path)], capture_output=True, text=True, timeout=120,
                       env=subprocess_env(), cwd=REPO)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0] == expected.format(path=path), r.stdout + r.stderr[-2000:]
    assert float(lines[1].split()[1]) < 5


def test_zip_bomb_workbook_is_refused_before_unpacking(tmp_path):
    write_table(pd.DataFrame({"text_cn": ["a"]}), tmp_path / "ok.xlsx")
    path = tmp_path / "bomb.xlsx"
    _patch_sheet(tmp_path / "ok.xlsx", path, "", pad=64 << 20)  # 64 MiB of spaces: ~1000x compression
    t = time.time()
    msg = error(path)
    assert time.time() - t < 2
    assert msg.startswith(f"{path}: part xl/worksheets/sheet1.xml unpacks ") and "x (more than 200x: a zip bomb" in msg


def test_text_longer_than_an_excel_cell_is_an_error_before_writing(tmp_path):
    long = "长" * 32_768
    with pytest.raises(UserError) as e:
        write_table(pd.DataFrame({"text_cn": ["短", long]}), tmp_path / "t.xlsx")
    assert str(e.value) == f"{tmp_path / 't.xlsx'}: 'text_cn' in row 3 has 32,768 characters, more than an Excel " \
                           "cell holds (32,767); write .csv, .jsonl or .parquet instead"
    assert list(tmp_path.iterdir()) == []
    write_table(pd.DataFrame({"text_cn": ["短", long]}), tmp_path / "t.csv")
    assert read_table(tmp_path / "t.csv")["text_cn"].tolist() == ["短", long]
