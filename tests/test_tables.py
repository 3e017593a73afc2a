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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(FORMATS), values=st.lists(texts, min_size=1, max_size=8))
@example(fmt="xlsx", values=["_x0007_\x07"])
def test_property_any_text_round_trips_unchanged(tmp_path, fmt, values):
    assert roundtrip(fmt, values, tmp_path) == values
