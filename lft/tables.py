"""Tables on disk: .xlsx (the original format), .csv, .jsonl, .parquet. Chosen by the file suffix.

Reading and writing both live here so the exporter's output is exactly what the trainer reads. The rules,
the same in every format:
- a text is written as text and read back unchanged: no formulas (a text starting with "=" is a string cell),
  no NA guessing ("NA", "null", "#N/A" stay text), control characters kept (in .xlsx as Excel's own
  `_xHHHH_` escapes, which Excel decodes too);
- a missing value (None, NaN, pd.NA, NaT) and an empty cell are both read back as None; a row with no
  value at all is skipped, like a blank line;
- every data row knows the line (csv, jsonl) or sheet row (xlsx) it came from, for error messages;
- a damaged or hostile file is a one-line UserError naming the file and the line, never a traceback, a
  silently merged row, or a grid the size of the sheet's claimed dimension.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import re
import zipfile
from pathlib import Path

from .common import UserError, atomic_path, gc_paused, lazy_import

pd = lazy_import("pandas")  # loaded on first use: the scripts that read tables answer --help at once

FORMATS = (".xlsx", ".csv", ".jsonl", ".parquet")
EXCEL_MAX_ROWS = 1_048_576  # Excel's sheet limit, header row included
EXCEL_MAX_CHARS = 32_767    # Excel's limit for the text of one cell
OLE2_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")  # compound-file header: encrypted .xlsx and legacy .xls
MAX_COLUMNS = 512           # a table wider than this is not a data set (and would be a dense grid to build)
MAX_XLSX_BYTES = 4 << 30    # uncompressed size of all the parts of one workbook
MAX_ZIP_RATIO = 200         # uncompressed/compressed size of a part over 8 MiB; sheet XML is ~5-30x
# Characters XML 1.0 cannot hold, plus "\r" (an XML reader turns it into "\n"): stored as _xHHHH_ in .xlsx.
_XLSX_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0d\x0e-\x1f\ufffe\uffff]")
_XLSX_ESCAPE = re.compile("_(?=x[0-9A-Fa-f]{4}_)")  # a literal "_x0041_" must not be decoded on reading
_XLSX_ESCAPED = re.compile("_x([0-9A-Fa-f]{4})_")


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


def is_missing(value) -> bool:
    """None, NaN, pd.NA, NaT (pandas' and numpy's): a cell with no value."""
    kind = type(value)
    if kind is str or kind is int or kind is bool:  # nearly every cell of a data file (texts, label ids, flags):
        return False                                # decided without touching pandas
    if value is None:
        return True
    if kind is float:
        return math.isnan(value)
    if value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, str):  # str subclasses (numpy's str_)
        return False
    if isinstance(value, float):
        return math.isnan(value)
    try:
        return pd.api.types.is_scalar(value) and bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _cell(value):
    """The value a reader returns: None for anything missing or empty, otherwise the value as stored."""
    return None if is_missing(value) or (isinstance(value, str) and value == "") else value


def read_table(path) -> pd.DataFrame:
    """Read a whole table as strings-or-numbers, exactly as stored. Errors name the file."""
    return read_table_rows(path)[0]


@gc_paused()  # builds ~10 objects per row: cyclic collections walking torch's objects cost ~1/3 of the read
def read_table_rows(path) -> tuple[pd.DataFrame, list[int]]:
    """The table and, for each data row, where a user finds it: the csv/jsonl line, the sheet row (header
    rows and blank lines counted), or the record number of a parquet file."""
    path = Path(path)
    fmt = table_format(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    try:
        if fmt == ".xlsx":
            header, rows, where = _read_xlsx(path)
        elif fmt == ".csv":
            header, rows, where = _read_csv(path)
        elif fmt == ".jsonl":
            header, rows, where = _read_jsonl(path)
        else:
            header, rows, where = _read_parquet(path)
    except (UserError, MemoryError):
        raise
    except Exception as e:  # pandas/openpyxl/pyarrow raise many types for a damaged file; one line is what users need
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot read as {fmt[1:]} ({first[:300]})") from None
    _check_header(path, fmt, header)
    width = len(header)
    keep = [k for k, r in enumerate(rows) if r.count(None) < len(r)]  # a row with no value at all is
    if len(keep) < len(rows):                                                # skipped, like a blank line
        rows, where = [rows[k] for k in keep], [where[k] for k in keep]
    df = pd.DataFrame([list(r) + [None] * (width - len(r)) for r in rows], columns=header, dtype=object)
    return df, where


def _check_header(path, fmt, header) -> None:
    seen = {}
    for i, name in enumerate(header):
        seen.setdefault(name, []).append(i)
    dups = {name: at for name, at in seen.items() if len(at) > 1}
    if dups:
        name, at = next(iter(dups.items()))
        if fmt == ".xlsx":
            from openpyxl.utils import get_column_letter

            places = ", ".join(get_column_letter(i + 1) for i in at)
        else:
            places = ", ".join(str(i + 1) for i in at)
        raise UserError(f"{path}: column {name!r} appears {len(at)} times in the header (columns {places}); "
                        "rename or delete the extra one(s), so it is clear which one is meant")


def _name_columns(header: list, width: int) -> list:
    """Header cells as column names; an empty header cell is named like pandas does: 'Unnamed: 3'."""
    header = list(header) + [None] * (width - len(header))
    return [f"Unnamed: {i}" if _cell(h) is None else h for i, h in enumerate(header)]


# --- .xlsx ----------------------------------------------------------------------------------------------------

def _check_workbook(path: Path) -> None:
    """Refuse a workbook before reading it if it claims more than any data set needs (a zip bomb)."""
    with path.open("rb") as f:
        magic = f.read(8)
    if magic == OLE2_MAGIC:  # an .xlsx is a zip; an encrypted one is an OLE2 container, like an old .xls
        raise UserError(f"{path}: password-protected (encrypted) workbook or an old .xls; open it in Excel, "
                        "remove the password and save as .xlsx")
    if magic[:2] != b"PK":
        raise UserError(f"{path}: not an .xlsx workbook (damaged, or another format renamed); re-export it")
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    total = sum(i.file_size for i in infos)
    if total > MAX_XLSX_BYTES:
        raise UserError(f"{path}: the workbook unpacks to {total / 2**30:.1f} GiB (limit "
                        f"{MAX_XLSX_BYTES / 2**30:.0f} GiB); split it, or save it as .csv/.parquet")
    for i in infos:
        if i.file_size > 8 << 20 and i.file_size > MAX_ZIP_RATIO * max(i.compress_size, 1):
            raise UserError(f"{path}: part {i.filename} unpacks {i.file_size // max(i.compress_size, 1):,}x "
                            f"(more than {MAX_ZIP_RATIO}x: a zip bomb, not a table); re-export the data")


def _read_xlsx(path: Path):
    """The first sheet, streamed row by row: only cells that hold a value are kept, so a sheet that claims
    (or has one cell at) XFD1048576 costs nothing. Formulas give their cached value, as in Excel."""
    _need("openpyxl", f"reading {path}")
    _check_workbook(path)
    import openpyxl
    from openpyxl.utils import get_column_letter
    from openpyxl.worksheet._reader import WorkSheetParser  # the row parser of read-only mode, without its padding

    wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        ws = wb.worksheets[0]
        header, rows, where = None, [], []
        with ws._get_source() as src:
            parser = WorkSheetParser(src, ws._shared_strings, data_only=True, epoch=wb.epoch,
                                     date_formats=wb._date_formats, timedelta_formats=wb._timedelta_formats)
            for idx, cells in parser.parse():
                values = {}
                for c in cells:
                    value = None if c["data_type"] == "e" else c["value"]  # a formula's error (#N/A, #REF!): no value
                    if isinstance(value, str):
                        value = _XLSX_ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), value)
                    value = _cell(value)
                    if value is None:
                        continue
                    if c["column"] > MAX_COLUMNS:
                        raise UserError(f"{path}: cell {get_column_letter(c['column'])}{idx} is beyond column "
                                        f"{get_column_letter(MAX_COLUMNS)} (a table has at most {MAX_COLUMNS} "
                                        "columns); delete it or move the data")
                    values[c["column"] - 1] = value
                if not values:
                    continue
                row = [None] * (max(values) + 1)
                for j, v in values.items():
                    row[j] = v
                if header is None:
                    header = row
                else:
                    rows.append(row)
                    where.append(idx)
    finally:
        wb.close()
    if header is None:
        return [], [], []
    width = max([len(header)] + [len(r) for r in rows])
    return _name_columns(header, width), rows, where


def _xlsx_value(value, path: Path, column, row: int):
    """A DataFrame value as an openpyxl cell value; texts escaped so that reading gives them back."""
    import datetime

    import numpy as np

    if is_missing(value):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, (bool, int, float, datetime.datetime, datetime.date, datetime.time, datetime.timedelta)):
        return value
    text = str(value)
    if text == "":
        return None
    text = _XLSX_UNSAFE.sub(lambda m: f"_x{ord(m.group(0)):04X}_", _XLSX_ESCAPE.sub("_x005F_", text))
    if len(text) > EXCEL_MAX_CHARS:
        raise UserError(f"{path}: {column} in row {row} has {len(text):,} characters, more than an Excel cell "
                        f"holds ({EXCEL_MAX_CHARS:,}); write .csv, .jsonl or .parquet instead")
    return text


def _write_xlsx(df: pd.DataFrame, path: Path, tmp: Path) -> None:
    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell

    # every cell is converted before the workbook is made: a bad value fails at once, not mid-write
    header = [_xlsx_value(c, path, "the header", 1) for c in df.columns]
    columns = [[_xlsx_value(v, path, repr(name), i + 2) for i, v in enumerate(df[name].tolist())]
               for name in df.columns]
    wb = Workbook(write_only=True)
    ws = wb.create_sheet()

    def text(value):
        cell = WriteOnlyCell(ws, value=value)
        cell.data_type = "s"  # text, even when it starts with "=": never a live formula
        return cell

    def row(values):
        return [text(v) if isinstance(v, str) else v for v in values]

    ws.append(row(header))
    for values in zip(*columns):
        ws.append(row(values))
    wb.save(tmp)


# --- .csv -----------------------------------------------------------------------------------------------------

def _read_csv(path: Path):
    """csv with Python's csv module in strict mode: a stray quote is an error naming its line, not a row that
    silently swallows the lines after it (pandas' parser merges them, or drops the quotes)."""
    header, chunks = _csv_chunks(path, size=None)
    rows, where = [], []
    for part_rows, part_where in chunks:
        rows += part_rows
        where += part_where
    return header, rows, where


def read_csv_chunks(path, size: int) -> tuple[list, "object"]:
    """(column names, an iterator of (DataFrame of up to `size` rows, their file lines)): the strict reading of
    read_table, `size` rows at a time in bounded memory (predict.py). Rows with no value at all are skipped, like
    blank lines; a duplicated header is an error."""
    path = Path(path)
    header, chunks = _csv_chunks(path, size)
    _check_header(path, ".csv", header)

    def frames():
        for rows, where in chunks:
            keep = [k for k, r in enumerate(rows) if any(v is not None for v in r)]
            rows, where = [rows[k] for k in keep], [where[k] for k in keep]
            yield pd.DataFrame([list(r) + [None] * (len(header) - len(r)) for r in rows], columns=header,
                               dtype=object), where
    return header, frames()


def _csv_chunks(path: Path, size: int | None):
    """(column names, an iterator of (rows, their first lines)), `size` records at a time (None: all at once).
    Every check of the strict reading applies to each chunk: quotes, fields past the header, merged lines."""
    csv.field_size_limit(1 << 30)
    try:
        f = path.open("r", encoding="utf-8-sig", newline="")
        reader = csv.reader(f, strict=True)
        records = _csv_records(path, reader)
        first = next(records, None)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-save it as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from None
    if first is None:
        f.close()
        return [], iter(())
    header = first[1]

    def chunks():
        with f:
            while True:
                try:
                    part = list(itertools.islice(records, size)) if size else list(records)
                except UnicodeDecodeError:
                    raise UserError(f"{path}: not UTF-8 text; re-save it as UTF-8 (e.g. iconv -f GBK -t UTF-8)"
                                    ) from None
                if not part:
                    return
                where, rows = [line for line, _ in part], [r for _, r in part]
                for r, line in zip(rows, where):
                    if len(r) > len(header):
                        raise UserError(f"{path}: line {line} has {len(r)} fields but the header has "
                                        f"{len(header)}; a text with a comma must be quoted (\"...\")")
                _check_merged_lines(path, header, rows, where)
                yield [[_cell(v) for v in r] for r in rows], where
                if not size:
                    return
    return _name_columns(header, len(header)), chunks()


def _csv_records(path: Path, reader):
    """(first line, fields) of each non-blank record; a quoting error names its line."""
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(_csv_quote_error(path, start, str(e))) from None
        if record:  # a blank line is skipped, but counted
            yield start, record
        start = reader.line_num + 1


def _csv_quote_error(path: Path, line: int, why: str) -> str:
    what = ("a quoted text starting on this line never ends" if "end of data" in why else
            "a quote (\") closes a quoted text and more text follows it")
    return (f"{path}: line {line}: {what} ({why}); inside a quoted text every \" must be doubled (\"\"), as Excel "
            "and pandas write it: fix the line or re-export the file")


def _check_merged_lines(path: Path, header: list, rows: list, where: list) -> None:
    """A field that spans lines, one of which reads like a whole row of this file (the same number of fields,
    and a value that occurs in that column elsewhere, e.g. a label), is a quote that swallowed rows."""
    if len(header) < 2:
        return
    multi = [(k, j) for k, r in enumerate(rows) for j, v in enumerate(r) if "\n" in v or "\r" in v]
    if not multi:
        return
    values = [set() for _ in header]
    for r in rows:
        for j, v in enumerate(r):
            if "\n" not in v and "\r" not in v:
                values[j].add(v)
    for k, j in multi:
        for inner in re.split("\r\n|\r|\n", rows[k][j])[1:]:  # the lines csv sees (not str.splitlines')
            fields = next(csv.reader([inner]), [])
            if len(fields) == len(header) and any(f and f in values[i] for i, f in enumerate(fields) if i != j):
                raise UserError(f"{path}: line {where[k]}: a quoted text runs over several lines and takes in "
                                f"what looks like a whole row ({inner[:60]!r}): an unescaped quote (\"); inside "
                                "a quoted text every \" must be doubled (\"\"): fix the line or re-export the file")


# --- .jsonl ---------------------------------------------------------------------------------------------------

def _read_jsonl(path: Path):
    header, rows, where = {}, [], []
    try:
        with path.open("r", encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = _JSONL.decode(line)
                except ValueError as e:
                    raise UserError(f"{path}: line {line_no}: not a JSON object ({e}); one object per line") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}: line {line_no}: a JSON {type(record).__name__}, not an object "
                                    "({\"column\": value, ...}); one object per line")
                for key in record:
                    header.setdefault(key, len(header))
                rows.append(record)
                where.append(line_no)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-save it as UTF-8") from None
    names = list(header)
    return names, [[_cell(r.get(name)) for name in names] for r in rows], where


def _unique_keys(pairs):
    record = dict(pairs)
    if len(record) != len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the key {dup!r} appears twice in one object")
    return record


_JSONL = json.JSONDecoder(object_pairs_hook=_unique_keys)  # one decoder: json.loads builds one per call


# --- .parquet -------------------------------------------------------------------------------------------------

def _read_parquet(path: Path):
    _need("pyarrow", f"reading {path}")
    import pyarrow.parquet as pq

    names = list(pq.read_schema(path).names)
    if len(set(names)) < len(names):
        return names, [], []  # the header check names the duplicate
    table = pq.read_table(path)
    columns = [[_cell(v) for v in table.column(n).to_pandas().astype(object).tolist()] for n in names]
    rows = [list(r) for r in zip(*columns)] if columns else []
    return names, rows, list(range(1, len(rows) + 1))


# --- writing --------------------------------------------------------------------------------------------------

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
    """Write atomically (temp file + rename): a crash never leaves a half-written table. Every value that the
    format cannot hold is found before the file is started."""
    path = Path(path)
    fmt = table_format(path)
    dups = sorted({str(c) for c in df.columns if list(df.columns).count(c) > 1})
    if dups:
        raise UserError(f"{path}: column(s) {', '.join(dups)} appear twice; a table needs distinct column names")
    if fmt == ".xlsx":
        if len(df) + 1 > EXCEL_MAX_ROWS:
            raise UserError(f"{path}: {len(df):,} rows exceed Excel's limit of {EXCEL_MAX_ROWS - 1:,}; "
                            "write .csv, .jsonl or .parquet instead")
        _need("openpyxl", f"writing {path}")
    if fmt == ".parquet":
        _need("pyarrow", f"writing {path}")
    with atomic_path(path) as tmp:
        if fmt == ".xlsx":
            _write_xlsx(df, path, tmp)
        elif fmt == ".csv":
            # CRLF line ends (RFC 4180, as Excel writes): then a text holding "\r" is quoted, as it must be
            df.to_csv(tmp, index=False, encoding="utf-8", lineterminator="\r\n")
        elif fmt == ".jsonl":
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            df.to_parquet(tmp, index=False)
