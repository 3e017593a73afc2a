"""Tables on disk: .xlsx (the original format), .csv, .jsonl, .parquet. Chosen by the file suffix.

Reading and writing both live here so the exporter's output is exactly what the trainer reads.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .common import UserError, atomic_path

FORMATS = (".xlsx", ".csv", ".jsonl", ".parquet")
EXCEL_MAX_ROWS = 1_048_576  # Excel's sheet limit, header row included
OLE2_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")  # compound-file header: encrypted .xlsx and legacy .xls


def table_format(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(FORMATS)}")
    return suffix


def _need(module: str, why: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{why} needs the package '{module}': pip install {module}") from None


def read_table(path) -> pd.DataFrame:
    """Read a whole table as strings-or-numbers, exactly as stored. Errors name the file."""
    path = Path(path)
    fmt = table_format(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    if fmt == ".xlsx":
        with path.open("rb") as f:
            magic = f.read(8)
        if magic == OLE2_MAGIC:  # an .xlsx is a zip; an encrypted one is an OLE2 container, like an old .xls
            raise UserError(f"{path}: password-protected (encrypted) workbook or an old .xls; open it in Excel, "
                            "remove the password and save as .xlsx")
        if magic[:2] != b"PK":
            raise UserError(f"{path}: not an .xlsx workbook (damaged, or another format renamed); re-export it")
    try:
        if fmt == ".xlsx":
            _need("openpyxl", f"reading {path}")
            df = pd.read_excel(path, sheet_name=0, dtype=object, engine="openpyxl")
        elif fmt == ".csv":
            try:
                df = pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
            except UnicodeDecodeError:
                raise UserError(f"{path}: not UTF-8 text; re-save it as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from None
        elif fmt == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        else:
            _need("pyarrow", f"reading {path}")
            df = pd.read_parquet(path)
    except UserError:
        raise
    except Exception as e:  # pandas/openpyxl raise many types for a damaged file; one line is what users need
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot read as {fmt[1:]} ({first})") from None
    return df


def sheet_names(path) -> list[str]:
    """The sheets of an .xlsx workbook, in order ([] if it cannot be read)."""
    try:
        import openpyxl

        wb = openpyxl.load_workbook(path, read_only=True)
        try:
            return list(wb.sheetnames)
        finally:
            wb.close()
    except Exception:  # only used to improve a message
        return []


def write_table(df: pd.DataFrame, path) -> None:
    """Write atomically (temp file + rename): a crash never leaves a half-written table."""
    path = Path(path)
    fmt = table_format(path)
    if fmt == ".xlsx":
        if len(df) + 1 > EXCEL_MAX_ROWS:
            raise UserError(f"{path}: {len(df):,} rows exceed Excel's limit of {EXCEL_MAX_ROWS - 1:,}; "
                            "write .csv, .jsonl or .parquet instead")
        _need("openpyxl", f"writing {path}")
    if fmt == ".parquet":
        _need("pyarrow", f"writing {path}")
    with atomic_path(path) as tmp:
        if fmt == ".xlsx":
            df.to_excel(tmp, index=False, engine="openpyxl")
        elif fmt == ".csv":
            df.to_csv(tmp, index=False, encoding="utf-8")
        elif fmt == ".jsonl":
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            df.to_parquet(tmp, index=False)

