"""Errors users see, the CLI wrapper every script uses, atomic writes, secret redaction, OOM hints."""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path


# Python 3.11 or newer: the pinned transformers, pandas, numpy, scikit-learn, matplotlib, pyarrow and pymongo
# require it (their Requires-Python); the code itself needs 3.10 (dataclass(slots=True), X | Y unions).
MIN_PYTHON = (3, 11)


def check_python(version=None) -> None:
    """Exit (status 2) with one line on stderr when this Python is older than MIN_PYTHON.

    Call it first in a script, before importing torch or transformers, whose own failure on an old Python is a
    traceback or a pip resolver error far from the cause. This module parses on Python 3.8 so the check runs:
        from lft.common import check_python
        check_python()
    """
    v = tuple(sys.version_info if version is None else version)[:3]
    if v[:2] < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        print(f"error: Python {'.'.join(map(str, v))} is too old: LLM_Fine_Tuning needs Python >= {need} "
              f"(its pinned transformers, pandas and numpy do); run it with python{need} or newer", file=sys.stderr)
        sys.exit(2)


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


def exit_script(main) -> None:
    """A script's last line: exit with `run_cli(main)`'s status. The heap is frozen first (gc.freeze), so the
    interpreter's shutdown does not walk the ~400k objects torch and transformers create (~1 s of every command,
    measured on CPU after importing transformers' Qwen3Model); the OS frees the process's memory anyway.
    stdout/stderr are flushed, atexit handlers and threads finish as before. Tests call run_cli, not this: in a
    long-lived process a frozen heap would hide every object alive at that moment from the cyclic collector."""
    rc = run_cli(main)
    gc.freeze()
    sys.exit(rc)


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


def read_json_object(path, fix: str) -> dict:
    """The JSON object in the file `path`, or a one-line UserError that names the file and ends with `fix`."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # a UnicodeDecodeError is a ValueError
        raise UserError(f"{path}: not valid JSON ({str(e).splitlines()[0][:100]}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a JSON object; {fix}")
    return obj


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")


# scheme:/+ also catches a URI that went through Path() ("mongodb:/user:pw@host": Path folds the "//"). The
# password is everything up to the token's last "@" (a host has none), so a password may hold "/", ":" or "@".
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*:/+)(?P<user>[^:/\s]+):(?P<pw>\S*)@")
# any key that ends in a secret's name (MONGO_PASSWORD, db_pwd, tlsCertificateKeyFilePassword, GITHUB_TOKEN,
# x-api-key), as k=v, k: v, "k": "v" or 'k': 'v'; the value is quoted text or runs to a space, "&" or ";"
_KEY_SECRETS = re.compile(
    r"""(?i)(?<![a-z0-9])(?P<key>[a-z0-9_.-]*(?:password|passwd|pwd|secret|token|api[_-]?key))"""
    r"""(?P<sep>["']?\s*[:=]\s*)(?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s&;]+)""")


def redact(text: str) -> str:
    """Hide the password in any `scheme://user:password@host` and the value of any `*password=...`,
    `*_token: ...`, `"*secret": "..."`-style pair in `text`."""
    text = _URI_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))

    def hide(m):
        quote = m["value"][0] if m["value"][0] in "\"'" else ""
        return f"{m['key']}{m['sep']}{quote}***{quote}"

    return _KEY_SECRETS.sub(hide, text)


def display_width(text: str) -> int:
    """Columns `text` takes in a terminal: CJK (wide/full-width) characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every flag's default."""


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
        raise UserError(f"out of GPU memory ({oom_summary(str(e))}); {fix}") from None


def oom_summary(message: str) -> str:
    """The numbers of torch's out-of-memory message that say what to do: the request, this process's use, and
    how much of it is allocated and how much reserved but free (fragmentation). Other messages: the first line."""
    import re

    found = [re.search(pattern, message) for pattern in (
        r"Tried to allocate ([\d.]+ [KMG]iB)", r"this process has ([\d.]+ [KMG]iB) memory in use",
        r"([\d.]+ [KMG]iB) is allocated by PyTorch", r"([\d.]+ [KMG]iB) is reserved by PyTorch but unallocated")]
    if not found[0]:
        return (message.strip().splitlines() or [""])[0][:200]
    parts = [f"tried to allocate {found[0][1]}"]
    if found[1]:
        parts.append(f"this process holds {found[1][1]}")
    if found[2] and found[3]:
        parts.append(f"{found[2][1]} allocated, {found[3][1]} reserved but free")
    return ", ".join(parts)


def safe_args(args) -> dict:
    """The run's arguments as recorded in args.json and every adapter: strings with any password removed
    (attributes starting with "_" are the script's own bookkeeping, not arguments)."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in vars(args).items() if not k.startswith("_")}


_GC_PAUSES = {"depth": 0, "was_enabled": True}
_GC_LOCK = threading.Lock()


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for a block that creates hundreds of thousands of objects at once,
    such as parsing Qwen3's 6 MB tokenizer.json. Once torch and transformers are imported, each such block sets
    off full collections that walk all their objects (0.1-0.25 s each; 5 while loading a model, ~0.85 s, measured
    on CPU). Nothing is kept: cycles the block leaves are collected after it. Blocks may overlap across threads;
    the collector resumes when the last one ends (and only if it was on before the first)."""
    with _GC_LOCK:
        if _GC_PAUSES["depth"] == 0:
            _GC_PAUSES["was_enabled"] = gc.isenabled()
            gc.disable()
        _GC_PAUSES["depth"] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_PAUSES["depth"] -= 1
            if _GC_PAUSES["depth"] == 0 and _GC_PAUSES["was_enabled"]:
                gc.enable()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl: their allocator decides)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the operating system (glibc's malloc_trim; nothing elsewhere).
    Replacing a model's weights on the CPU frees thousands of tensors of 4-16 MB: glibc keeps such blocks in its
    heap for reuse, so the freed memory still counts as the process's. Loading the Qwen3-1.7B shape with int8
    weights left 0.78 GiB of it behind (2.80 GiB anonymous memory after the load, 2.01 after a trim)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _Deferred:
    """Stands for a module until an attribute is first read, then imports it the ordinary way."""

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", None)

    def __getattr__(self, attr):
        module = object.__getattribute__(self, "_module")
        if module is None:
            import importlib

            module = importlib.import_module(object.__getattribute__(self, "_name"))
            object.__setattr__(self, "_module", module)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<deferred module {object.__getattribute__(self, '_name')!r}>"


class Background:
    """fn() in a thread, started now; result() waits and returns its value or raises its exception here. For work
    that runs outside the GIL, or beside a main thread that waits on the GPU: train_lora.py tokenises while the
    model loads and compiles (the tokenizers backend and inductor's compile workers run outside the GIL; the
    original recipe's 63,000 texts took 9-13 s after the compile on an H200, run 19), test_saved_lora.py imports
    what its reports need while it evaluates. A daemon thread, not a ThreadPoolExecutor's: when the main thread
    fails (out of memory loading the model, say), the process exits at once instead of waiting for it."""

    def __init__(self, fn):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="lft-background", daemon=True)
        self._thread.start()

    def _run(self, fn):
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._error = e

    def join(self) -> None:
        """Wait for fn to end; its value or exception stays for result()."""
        self._thread.join()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def seconds_since_launch() -> float | None:
    """Seconds since this process started (the kernel's clock: interpreter start-up and imports included), or
    None where /proc does not say (not Linux)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def lazy_import(name: str):
    """`name` as a stand-in that imports the module (an ordinary import, nothing else changes) on the first
    attribute read. Scripts reach torch, pandas and the modules built on them this way, so `--help` and flag
    errors answer in a fraction of a second instead of the 2-7 s that importing torch takes. (importlib's
    LazyLoader is not used: it breaks packages such as torch that set attributes on themselves while loading.)"""
    return _Deferred(name)


def print_table(header: list[str], rows: list[list[str]], file=None) -> None:
    """A plain text table: first column left-aligned, the others right-aligned, CJK counted as two columns."""
    table = [header] + rows
    widths = [max(display_width(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(s + " " * (w - display_width(s)) if i == 0 else " " * (w - display_width(s)) + s
                        for i, (s, w) in enumerate(zip(r, widths))), file=file)
