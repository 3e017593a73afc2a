"""Import time of what a script pulls in before its first real work, from `python -X importtime`.

Each code snippet runs in a fresh interpreter --runs times (the first run may write bytecode; the last is
reported). Prints, per snippet, the wall time and the heaviest modules by cumulative import time, with the
module that imported each (its nearest heavy parent), so a slow chain reads as one line.

    python bench/bench_imports.py                                # the default snippets
    python bench/bench_imports.py --code "import torch; import peft"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SNIPPETS = {
    "torch": "import torch",
    "torch + transformers' Qwen3Model": "import torch; from transformers import Qwen3Model",
    "+ AutoTokenizer + peft": "import torch; from transformers import Qwen3Model, AutoTokenizer; import peft",
    "the model module (own decoder) + AutoTokenizer":
        "import torch, qwen3_classification_direct; from transformers import AutoTokenizer",
    "outputs: pandas, sklearn.metrics, matplotlib.pyplot, openpyxl":
        "import pandas, sklearn.metrics, matplotlib.pyplot, openpyxl",
}
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse(stderr: str) -> list[tuple[int, int, str]]:
    """(cumulative us, depth, module) in the order importtime prints them (children before parents)."""
    return [(int(m.group(2)), len(m.group(3)) // 2, m.group(4)) for m in map(LINE.match, stderr.splitlines()) if m]


def heaviest(rows, top: int, floor_us: int) -> list[dict]:
    """Modules over floor_us cumulative, each with its chain of heavy ancestors (outermost first)."""
    out, stack = [], []  # stack of (depth, module) of rows seen, to find each row's parents
    parents = {}
    for us, depth, mod in reversed(rows):  # parents come first when reversed
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[mod] = [m for _, m in stack]
        stack.append((depth, mod))
    cum = {mod: us for us, _, mod in rows}
    for us, depth, mod in sorted(rows, reverse=True):
        if us < floor_us:
            break
        chain = [p for p in parents[mod] if cum.get(p, 0) >= floor_us]
        out.append({"ms": round(us / 1000), "module": mod, "via": " > ".join(chain[-3:])})
    return out[:top]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", action="append", help="snippet(s) to time instead of the defaults")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--floor_ms", type=float, default=100)
    p.add_argument("--label", default="", help="a name for this environment (default: its transformers version)")
    p.add_argument("--out", default="bench_imports")
    args = p.parse_args()
    snippets = {c: c for c in args.code} if args.code else SNIPPETS
    if not args.label:
        import importlib.metadata

        args.label = f"transformers-{importlib.metadata.version('transformers')}"
    results = []
    for name, code in snippets.items():
        for _ in range(args.runs):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                               env=dict(os.environ), cwd=Path(__file__).resolve().parent.parent)
            wall = time.perf_counter() - t
        if r.returncode:
            print(f"{name}: failed\n{r.stderr[-2000:]}")
            continue
        rows = parse(r.stderr)
        heavy = heaviest(rows, args.top, int(args.floor_ms * 1000))
        results.append({"env": args.label, "snippet": name, "wall_s": round(wall, 2), "heaviest": heavy})
        print(f"\n### {args.label} {name}: {wall:.2f} s wall (last of {args.runs})\n\n| ms | module | imported via |\n"
              "|---|---|---|")
        for h in heavy:
            print(f"| {h['ms']} | {h['module']} | {h['via']} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"bench_imports{('_' + args.label) if args.label else ''}.json"
    path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
