"""Errors users see, the CLI wrapper every script uses, atomic writes, secret redaction, OOM hints."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input (flag, file, row). Printed as one line, exit status 2."""


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; turn a UserError into one line on stderr and exit status 2.

    Tracebacks are for bugs; bad input gets a sentence that names the file, row or flag.
    """
    try:
        rc = main(argv)
    except UserError as e:
        print(f"error: {' '.join(redact(e).split())}", file=sys.stderr)  # one line, never a password
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure delete it.

    The rename is atomic on POSIX, so a reader sees the old file or the whole new one, never half.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should read like any file the user writes
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; on success it replaces `path` (old one removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")


# scheme:/+ also catches a URI that went through Path() ("mongodb:/user:pw@host": Path folds the "//")
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*:/+)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")
_KEY_SECRETS = re.compile(r"(?i)\b(?P<key>password|passwd|pwd|secret|token|api_?key)=(?P<value>[^&;\s]+)")


def redact(text: str) -> str:
    """Hide the password in any `scheme://user:password@host` and any `password=...`-style pair in `text`."""
    text = _URI_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _KEY_SECRETS.sub(lambda m: f"{m['key']}=***", text)


def display_width(text: str) -> int:
    """Columns `text` takes in a terminal: CJK (wide/full-width) characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose error messages, which quote the offending argument, never show a password."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {redact(message)}\n")


@contextlib.contextmanager
def explain_oom(fix: str):
    """Turn a CUDA out-of-memory error into one line that says which flag to change."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"out of GPU memory ({first}); {fix}") from None


def safe_args(args) -> dict:
    """The run's arguments as recorded in args.json and every adapter: strings with any password removed."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in vars(args).items()}


def print_table(header: list[str], rows: list[list[str]], file=None) -> None:
    """A plain text table: first column left-aligned, the others right-aligned, CJK counted as two columns."""
    table = [header] + rows
    widths = [max(display_width(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(s + " " * (w - display_width(s)) if i == 0 else " " * (w - display_width(s)) + s
                        for i, (s, w) in enumerate(zip(r, widths))), file=file)
