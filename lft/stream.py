"""Tables read and written chunk by chunk, so predict.py labels any number of rows in bounded memory.

    src = open_source("in.csv", text_column="text_cn")      # header/schema read, columns checked
    n, bad = src.scan(10_000)                                 # the text column only: rows and bad texts
    with open_sink("out.csv", src, id_column=None) as write:  # temp file beside out.csv, renamed at the end
        for chunk in src.chunks(10_000):                      # Chunk(rows, texts, data)
            write(chunk, {"label": [...], "score": [...], ...})

Formats, by suffix: .csv (lft.tables' strict csv reading, a chunk at a time / to_csv append, CRLF line ends
as lft.tables writes them), .jsonl and `-` (stdin/stdout; one JSON
object per line, parsed and written line by line: every field passes through untouched), .parquet (pyarrow
iter_batches / ParquetWriter: column types kept), .xlsx (read whole and written with lft.tables.write_table:
Excel's row limit bounds it). Output rows keep the input's order and columns; an id column goes first.

Rows are named as users find them: csv and jsonl by the file's own line numbers (blank lines included), xlsx by
the sheet's row numbers (the header is row 1), parquet rows from 1.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .common import UserError, atomic_path
from .tables import read_csv_chunks, read_table_rows, table_format, write_table

STDIO = "-"
SHOW_ROWS = 8  # row numbers named in a message


@dataclass
class Chunk:
    rows: list[int]          # row/line numbers as the user sees them
    texts: list[str | None]  # the text of each row; None: missing, empty or not text
    data: object             # the rows themselves: DataFrame (csv, xlsx), list of dicts (jsonl), RecordBatch


def as_text(value) -> str | None:
    """A cell as the text to classify, or None if it has none. Numbers read as written (3.0 -> "3"), like the
    trainer; lists and objects are not text."""
    if value is None or isinstance(value, (list, tuple, dict, bytes, bytearray)):
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)
    text = str(value)
    return text if text.strip() else None


def name_rows(rows: list[int], total: int) -> str:
    shown = ", ".join(map(str, rows[:SHOW_ROWS]))
    return shown + (f" and {total - SHOW_ROWS} more" if total > SHOW_ROWS else "")


class Source:
    """One input table. `columns`: its columns (jsonl: the keys of its objects, first seen first)."""

    unit = "row"

    def __init__(self, path, text_column: str):
        self.path, self.text_column = path, text_column
        self.columns: list[str] = []
        self.total: int | None = None  # known after scan() (parquet, xlsx: at once)
        self.chars: int | None = None  # known after scan()

    @property
    def fmt(self) -> str:
        return ".jsonl" if self.path == STDIO else table_format(self.path)

    def scan(self, size: int, cap: int | None = None) -> tuple[int, tuple[int, list[int]]]:
        """(rows, (bad texts, the first bad row numbers)) from the text column alone. Also sets `chars`: the
        characters of the texts, each counted up to `cap` (about the tokens the model will read: a Chinese
        character is about one Qwen3 token)."""
        n, bad, first, chars = 0, 0, [], 0
        cap = cap or 1 << 62
        for rows, texts in self._texts(size):
            n += len(rows)
            for r, t in zip(rows, texts):
                if t is None:
                    bad += 1
                    if len(first) < SHOW_ROWS:
                        first.append(r)
                else:
                    chars += min(len(t), cap)
        self.total, self.chars = n, chars
        return n, (bad, first)

    def _texts(self, size):
        for chunk in self.chunks(size):
            yield chunk.rows, chunk.texts

    def chunks(self, size: int):
        raise NotImplementedError

    def check_columns(self, need: list[tuple[str, str]]) -> None:
        missing = [f"{c} ({flag})" for c, flag in need if c not in self.columns]
        if missing:
            raise UserError(f"{self.path}: missing column(s) {', '.join(missing)}; found "
                            f"{', '.join(map(str, self.columns)) or '(none)'}")


def _read_error(path, fmt: str, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"{path}: cannot read as {fmt} ({first[:200]})")


class CsvSource(Source):
    """The strict csv reading of lft.tables (a stray quote names its line, blank lines keep the file's line
    numbers, a duplicated header is an error), a chunk at a time. Rows are named by their file line, as the
    trainer's errors name them."""

    def __init__(self, path, text_column):
        super().__init__(path, text_column)
        self.columns = [str(c) for c in read_csv_chunks(self.path, 1)[0]]

    def chunks(self, size):
        for df, lines in read_csv_chunks(self.path, size)[1]:
            df.columns = self.columns
            yield Chunk(lines, [as_text(v) for v in df[self.text_column].tolist()], df)


class JsonlSource(Source):
    unit = "line"

    def __init__(self, path, text_column):
        super().__init__(path, text_column)
        if path != STDIO:  # the keys of every object (stdin can only be read once: its keys are not checked)
            keys = {}
            for _, objs in self._iter(1 << 14):
                for obj in objs:
                    keys.update(dict.fromkeys(obj))
            self.columns = list(keys)

    def _lines(self):
        if self.path == STDIO:
            yield from enumerate(sys.stdin, 1)
            return
        try:
            with open(self.path, encoding="utf-8-sig") as f:
                yield from enumerate(f, 1)
        except UnicodeDecodeError:
            raise UserError(f"{self.path}: not UTF-8 text; re-save it as UTF-8") from None

    def _iter(self, size):
        rows, objs = [], []
        for number, line in self._lines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UserError(f"{self.path}: line {number} is not JSON ({str(e)[:80]}); each line must be one "
                                "JSON object") from None
            if not isinstance(obj, dict):
                raise UserError(f"{self.path}: line {number} holds a {type(obj).__name__}, not a JSON object")
            rows.append(number)
            objs.append(obj)
            if len(objs) == size:
                yield rows, objs
                rows, objs = [], []
        if objs:
            yield rows, objs

    def chunks(self, size):
        for rows, objs in self._iter(size):
            yield Chunk(rows, [as_text(o.get(self.text_column)) for o in objs], objs)


class ParquetSource(Source):
    def __init__(self, path, text_column):
        import pyarrow.parquet as pq

        super().__init__(path, text_column)
        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise _read_error(path, "parquet", e) from None
        self.columns = list(self.file.schema_arrow.names)
        self.total = self.file.metadata.num_rows

    def _iter(self, size, columns=None):
        start = 0
        for batch in self.file.iter_batches(batch_size=size, columns=columns):
            rows = list(range(start + 1, start + 1 + batch.num_rows))
            start += batch.num_rows
            yield batch, rows

    def _texts(self, size):
        for batch, rows in self._iter(size, [self.text_column]):
            yield rows, [as_text(v) for v in batch.column(0).to_pylist()]

    def chunks(self, size):
        for batch, rows in self._iter(size):
            texts = batch.column(self.columns.index(self.text_column)).to_pylist()
            yield Chunk(rows, [as_text(v) for v in texts], batch)


class XlsxSource(Source):
    def __init__(self, path, text_column):
        super().__init__(path, text_column)
        self.df, self.where = read_table_rows(path)  # where: each row's number in the sheet
        self.columns = [str(c) for c in self.df.columns]
        self.df.columns = self.columns
        self.total = len(self.df)

    def chunks(self, size):
        for start in range(0, len(self.df), size):
            df = self.df.iloc[start:start + size]
            yield Chunk(self.where[start:start + size], [as_text(v) for v in df[self.text_column].tolist()], df)


def open_source(path, text_column: str) -> Source:
    if path != STDIO:
        fmt = table_format(path)
        if not Path(path).is_file():
            raise UserError(f"{path}: file not found")
        if Path(path).stat().st_size == 0:
            raise UserError(f"{path}: file is empty")
    else:
        fmt = ".jsonl"
    cls = {".csv": CsvSource, ".jsonl": JsonlSource, ".parquet": ParquetSource, ".xlsx": XlsxSource}[fmt]
    return cls(path, text_column)


# --- writing ----------------------------------------------------------------------------------------------

def _order(columns: list[str], id_column: str | None, new: list[str]) -> list[str]:
    return ([id_column] if id_column else []) + [c for c in columns if c != id_column] + new


@contextlib.contextmanager
def open_sink(path, src: Source, id_column: str | None = None):
    """Yield write(chunk, new_columns): the chunk's rows + the new columns, in order. A file appears at `path`
    only when the block ends without an error (temp file + rename); `-` writes JSON lines to stdout as it goes."""
    if path == STDIO:
        yield _jsonl_writer(sys.stdout, id_column)
        return
    fmt = table_format(path)
    if fmt == ".xlsx":
        import pandas as pd

        parts = []

        def write(chunk, new):
            parts.append(_frame(chunk.data, new, src.columns, id_column))
        yield write
        write_table(pd.concat(parts, ignore_index=True) if parts else
                    _frame(src.df.iloc[:0], {}, src.columns, id_column), path)
        return
    with atomic_path(path) as tmp:
        if fmt == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                yield _jsonl_writer(f, id_column)
        elif fmt == ".csv":
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                first = [True]

                def write(chunk, new):  # CRLF, as lft.tables writes csv: a text holding "\r" is then quoted
                    _frame(chunk.data, new, src.columns, id_column).to_csv(f, index=False, header=first[0],
                                                                          lineterminator="\r\n")
                    first[0] = False
                yield write
                if first[0]:  # no rows: the header alone
                    _frame(_empty_frame(src.columns), {}, src.columns, id_column).to_csv(f, index=False,
                                                                                        lineterminator="\r\n")
        else:
            with _parquet_writer(tmp, src, id_column) as write:
                yield write


def _empty_frame(columns):
    import pandas as pd

    return pd.DataFrame({c: [] for c in columns})


def _frame(df, new: dict, columns, id_column):
    df = df.copy()
    for name, values in new.items():
        df[name] = values
    return df[_order(columns, id_column, list(new))]


def _jsonl_writer(f, id_column):
    def write(chunk, new):
        names = list(new)
        lines = []
        for i, obj in enumerate(chunk.data):
            out = {id_column: obj.get(id_column)} if id_column else {}
            out.update((k, v) for k, v in obj.items() if k != id_column)
            out.update((k, new[k][i]) for k in names)
            lines.append(json.dumps(out, ensure_ascii=False, default=str) + "\n")
        f.write("".join(lines))
        f.flush()
    return write


@contextlib.contextmanager
def _parquet_writer(tmp, src: ParquetSource, id_column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    state = {"writer": None}

    def write(chunk, new):
        batch = chunk.data
        arrays = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
        for name, values in new.items():
            arrays[name] = pa.array(values, type=pa.string() if name == "label" else pa.float64())
        names = _order(src.columns, id_column, list(new))
        table = pa.Table.from_arrays([arrays[n] for n in names], names=names)
        if state["writer"] is None:
            state["writer"] = pq.ParquetWriter(str(tmp), table.schema)
        state["writer"].write_table(table)

    try:
        yield write
        if state["writer"] is None:  # no rows: the schema alone
            schema = src.file.schema_arrow.remove_metadata()
            names = _order(src.columns, id_column, [])
            pq.write_table(schema.empty_table().select(names), str(tmp))
    finally:
        if state["writer"] is not None:
            state["writer"].close()
