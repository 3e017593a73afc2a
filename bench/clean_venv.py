"""A virtual environment holding only what requirements.txt installs, made of links into this interpreter's
packages: the environment a user gets from `pip install -r requirements.txt`, on a machine whose image holds
far more.

Why: at start-up torch, networkx and dynamo list the entry points of every installed distribution
(importlib.metadata reads each one's entry_points.txt: ~7 listings in a warm train_lora.py set-up), so a start
pays for every distribution the environment holds. The GPU machine's image holds 216 with the carried wheels, this
environment ~100. Run 39 ran bench_all.py in it; the start-up rows came out as in the image (bench/RESULTS.md).

    python bench/clean_venv.py /tmp/cleanvenv          # then /tmp/cleanvenv/bin/python3 ...

The distributions taken: requirements.txt's names and everything they require (markers evaluated here, no
extras), each found where this interpreter finds it first (PYTHONPATH before site-packages, so carried wheels
win). Each distribution's top-level files and folders, and its .dist-info, are linked into the new
environment's site-packages. Names this interpreter does not have are listed and skipped.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent


def wanted_names(files: list[Path]) -> list[str]:
    names = []
    for f in files:
        for line in f.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                req = Requirement(line)
                if req.marker is None or req.marker.evaluate():
                    names.append(req.name)
    return names


def closure(names: list[str]) -> tuple[dict[str, md.Distribution], list[str]]:
    found, missing, todo = {}, [], [canonicalize_name(n) for n in names]
    env = dict(default_environment(), extra="")
    while todo:
        name = todo.pop()
        if name in found or name in missing:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
            continue
        found[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(canonicalize_name(req.name))
    return found, missing


def top_level(dist: md.Distribution) -> tuple[Path, set[str]]:
    """(the folder the distribution is installed in, the names there that belong to it)."""
    info = Path(dist._path)  # noqa: SLF001 - the .dist-info folder: there is no public accessor
    names = {info.name}
    for f in dist.files or []:
        parts = Path(f).parts
        if parts and parts[0] != ".." and not parts[0].endswith(".dist-info"):
            names.add(parts[0])
    if not dist.files:  # no RECORD: its top_level.txt, or its import name
        tops = (dist.read_text("top_level.txt") or canonicalize_name(dist.metadata["Name"]).replace("-", "_")).split()
        names.update(t for t in tops if (info.parent / t).exists() or (info.parent / f"{t}.py").exists())
        names.update(f"{t}.py" for t in tops if (info.parent / f"{t}.py").exists())
    return info.parent, names


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("venv", help="folder for the new environment (made fresh)")
    p.add_argument("--requirements", nargs="*", default=[str(REPO / "requirements.txt")])
    # peft: the benches' reference rows (transformers + peft, the original recipe) need it; the toolkit never imports it
    p.add_argument("--also", nargs="*", default=["torch", "pytest", "peft"], help="more distributions to take")
    args = p.parse_args()
    venv = Path(args.venv)
    if venv.exists():
        raise SystemExit(f"{venv} exists; give a new folder")
    dists, missing = closure(wanted_names([Path(r) for r in args.requirements]) + args.also)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python3"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    linked = 0
    for dist in dists.values():
        folder, names = top_level(dist)
        for name in names:
            src, dst = folder / name, site / name
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
                linked += 1
    n = subprocess.run([str(venv / "bin" / "python3"), "-c", "import importlib.metadata as m; "
                        "print(len(list(m.distributions())))"], capture_output=True, text=True, check=True)
    print(f"{venv}: {len(dists)} distributions ({linked} links; this interpreter sees "
          f"{len(list(md.distributions()))}, the new environment {n.stdout.strip()}); not installed here, "
          f"skipped: {', '.join(sorted(missing)) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
