"""Serving benchmark: serve.py under 64 concurrent clients vs the offline Predictor on the same texts, and the
latency of one short request on an idle server.

Builds a Qwen3-1.7B-shaped checkpoint (random weights, bench_gpu.build_checkpoint_folder) and a random LoRA
adapter for it, draws texts whose token lengths follow bench_gpu.lengths() (log-normal, median 70, clipped to
[8, 256]), then:
  offline  Classifier.proba_of_ids over all texts, rows of --max_batch_tokens (the server's budget): tokens/s
  (a)      serve.py; --clients concurrent clients (asyncio, spread over --client_procs processes) each send
           single-text /classify requests, first for --warmup s (not counted: new row shapes get their CUDA
           graphs), then for --duration s: served real tokens/s (usage.prompt_tokens), and its ratio to
           offline; forwards and texts/tokens per forward from /metrics
  (b)      one 70-token request at a time on the idle server, --latency_requests times: p50/p99 latency
and prints a markdown table (also written to --out/bench_serve.json).

    python bench/bench_serve.py                       # on a GPU (the H200 run)
    python bench/bench_serve.py --quick               # CPU smoke test on the tiny demo checkpoint (~1 min)
    python bench/bench_serve.py -- --cuda_graphs off  # flags after -- go to serve.py (and the offline run)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def build_adapter(ckpt: Path, folder: Path, device: str, max_length: int) -> Path:
    """A random LoRA adapter (r 8 on q/k/v/o, random B so it changes the output) + head for `ckpt`."""
    import torch

    import qwen3_classification_direct as qcd
    from lft import adapter
    from lft.labels import DEFAULT_LABELS

    if (folder / "classifier_config.json").is_file():
        return folder
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, identity = qcd.build_classifier(ckpt, list(DEFAULT_LABELS), dropout=0.0, dtype=dtype,
                                           lora=dict(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    meta = {"labels": list(DEFAULT_LABELS), "id2label": dict(enumerate(DEFAULT_LABELS)), "max_length": max_length,
            "base": identity, "args": {"bench": "bench_serve.py random adapter"}, "metrics": None}
    adapter.save_adapter(model, folder, meta)
    return folder


def make_texts(tokenizer, n: int, seed: int) -> list[str]:
    """Strings of about bench_gpu.lengths() tokens: random token ids decoded (their re-tokenised lengths are
    what gets counted, here and by the server)."""
    from bench_gpu import lengths, texts_of

    return [tokenizer.decode(ids).strip() or "空" for ids in texts_of(lengths(n, seed), seed + 1)]


def offline(clf, ids: list[list[int]], repeats: int) -> float:
    """Real tokens/s of Classifier.proba_of_ids (the server's forward path) after one warm-up pass."""
    import torch

    clf.proba_of_ids(ids)
    sync = torch.cuda.synchronize if clf.runtime.device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        clf.proba_of_ids(ids)
    sync()
    return repeats * sum(map(len, ids)) / (time.perf_counter() - t)


class Server:
    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                     env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                         filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))))
        self.url = self.ready_line = None
        self.workers = "?"
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                w = re.search(r"with (\d+) HTTP worker", line)
                if w:
                    self.workers = w.group(1)
                m = re.match(r"ready in .* on (http://\S+)$", line.strip())
                if m:
                    self.url, self.ready_line = m.group(1), line.strip()
                    ready.set()
                elif line.startswith(("error", "Traceback")) or "Error" in line:
                    print("server: " + line.rstrip(), flush=True)
        threading.Thread(target=read, daemon=True).start()
        while not ready.wait(0.5):
            if self.proc.poll() is not None:
                raise SystemExit(f"serve.py exited with {self.proc.returncode} before it was ready")

    def metrics(self) -> dict:
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


class Connection:
    """A keep-alive HTTP/1.1 connection on asyncio streams: the load must come from the server's side of the
    measurement, and httpx's pool costs ~10 ms of client CPU per request at 64 connections."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.r, self.w = host, port, None, None

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body, ensure_ascii=False).encode()
        self.w.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = (await self.r.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
        n = int({k.lower(): v for k, v in fields.items()}["content-length"])
        return int(head[0].split()[1]), json.loads(await self.r.readexactly(n))

    def close(self):
        if self.w is not None:
            self.w.close()


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return host.strip("[]"), int(port)


def client_proc(url: str, texts: list[str], clients: int, duration: float, offset: int) -> tuple[int, int, int]:
    """`clients` concurrent single-text /classify loops for `duration` s: (requests, tokens, errors)."""
    async def main():
        counts = [0, 0, 0]
        deadline = time.perf_counter() + duration

        async def loop(k):
            conn, i = Connection(*_host_port(url)), offset + k
            while time.perf_counter() < deadline:
                status, out = await conn.post("/classify", {"input": texts[i % len(texts)]})
                i += clients
                if status == 200:
                    counts[0] += 1
                    counts[1] += out["usage"]["prompt_tokens"]
                else:
                    counts[2] += 1
            conn.close()
        await asyncio.gather(*(loop(k) for k in range(clients)))
        return tuple(counts)
    return asyncio.run(main())


def load_phase(url: str, texts: list[str], clients: int, procs: int, duration: float) -> tuple[int, int, int, float]:
    per = [clients // procs + (k < clients % procs) for k in range(procs)]
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(procs) as pool:
        parts = pool.starmap(client_proc, [(url, texts, n, duration, 1000 * k) for k, n in enumerate(per)])
    wall = time.perf_counter() - t
    return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts), wall


def latency_phase(url: str, text: str, n: int) -> tuple[float, float]:
    async def main():
        conn, times = Connection(*_host_port(url)), []
        for k in range(n + 5):  # 5 warm-up requests
            t = time.perf_counter()
            status, out = await conn.post("/classify", {"input": text})
            assert status == 200, out
            if k >= 5:
                times.append(time.perf_counter() - t)
        conn.close()
        return sorted(times)
    times = asyncio.run(main())
    return times[len(times) // 2], times[min(n - 1, int(round(0.99 * (n - 1))))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU, tiny demo checkpoint, short phases (smoke test)")
    p.add_argument("--workdir", default="/tmp/lft_bench", help="checkpoint and adapter folders go here")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where bench_serve.json goes")
    p.add_argument("--duration", type=float, default=None, help="seconds of load (default 20; --quick 5)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of the same load before the measured phase "
                   "(new row shapes are captured as CUDA graphs then; default 5; --quick 1)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--client_procs", type=int, default=None, help="client processes (default 4; --quick 1)")
    p.add_argument("--latency_requests", type=int, default=None, help="default 200; --quick 50")
    p.add_argument("--texts", type=int, default=None, help="distinct texts (default 8192; --quick 512)")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--max_batch_tokens", type=int, default=16384)
    args, serve_flags = p.parse_known_args(argv)
    serve_flags = [f for f in serve_flags if f != "--"]
    q = args.quick
    duration = args.duration or (5.0 if q else 20.0)
    procs = args.client_procs or (1 if q else 4)
    n_latency = args.latency_requests or (50 if q else 200)
    n_texts = args.texts or (512 if q else 8192)
    work = Path(args.workdir)
    device = "cpu" if q else "cuda"

    import torch

    from lft.predict import Classifier, runtime_args

    if q:
        from lft.demo import build_tiny_qwen3

        ckpt = build_tiny_qwen3(work / "qwen3-tiny")
    else:
        from bench_gpu import build_checkpoint_folder

        ckpt = build_checkpoint_folder(work / "qwen3-1.7b-shaped")
    adapter_dir = build_adapter(ckpt, work / ("adapter-tiny" if q else "adapter-1.7b-shaped"), device, args.max_length)

    # offline: the same texts through the same forward path, in this process
    rt_args = runtime_args(device=device)
    for flag, value in zip(serve_flags[::2], serve_flags[1::2]):  # e.g. --cuda_graphs off, --compile off
        if flag.lstrip("-") in vars(rt_args):
            setattr(rt_args, flag.lstrip("-"), value)
    clf = Classifier.load(adapter_dir, args=rt_args, max_tokens=args.max_batch_tokens)
    texts = make_texts(clf.tokenizer, n_texts, seed=0)
    ids = clf.encode(texts)
    lat_text = min(texts, key=lambda t: abs(len(clf.encode([t])[0]) - 70))
    lat_tokens = len(clf.encode([lat_text])[0])
    offline_tps = offline(clf, ids, repeats=1 if q else 3)
    del clf
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"offline: {offline_tps:,.0f} tokens/s over {len(ids)} texts ({sum(map(len, ids)):,} tokens)", flush=True)

    server = Server(["--lora_model", str(adapter_dir), "--device", device, "--max_batch_tokens",
                     str(args.max_batch_tokens), *serve_flags])
    try:
        print(server.ready_line, flush=True)
        load_phase(server.url, texts, args.clients, procs, args.warmup if args.warmup is not None else 1 if q else 5)
        m0 = server.metrics()
        n_req, n_tok, n_err, wall = load_phase(server.url, texts, args.clients, procs, duration)
        m1 = server.metrics()
        time.sleep(1.0)
        p50, p99 = latency_phase(server.url, lat_text, n_latency)
    finally:
        rc = server.stop()
    forwards = m1["lft_serve_batch_texts_count"] - m0["lft_serve_batch_texts_count"]
    served_tps = n_tok / wall
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "checkpoint": ckpt.name,
           "ready_line": server.ready_line, "clients": args.clients, "client_procs": procs, "duration_s": wall,
           "requests": n_req, "errors": n_err, "requests_per_s": n_req / wall, "served_tokens_per_s": served_tps,
           "offline_tokens_per_s": offline_tps, "served_over_offline": served_tps / offline_tps,
           "forwards": forwards,
           "texts_per_forward": (m1["lft_serve_batch_texts_sum"] - m0["lft_serve_batch_texts_sum"]) / max(forwards, 1),
           "tokens_per_forward": (m1["lft_serve_batch_tokens_sum"] - m0["lft_serve_batch_tokens_sum"]) / max(forwards, 1),
           "latency_tokens": lat_tokens, "latency_requests": n_latency, "latency_p50_ms": 1000 * p50,
           "latency_p99_ms": 1000 * p99, "serve_flags": serve_flags, "exit_code": rc}
    res["http_workers"] = server.workers
    rows = [("server start", res["ready_line"]), ("HTTP worker processes", server.workers),
            (f"(a) {args.clients} clients x {wall:.1f} s: served real tokens/s", f"{served_tps:,.0f}"),
            ("(a) requests/s (errors)", f"{n_req / wall:,.1f} ({n_err})"),
            ("offline Predictor tokens/s, same texts", f"{offline_tps:,.0f}"),
            ("(a) served / offline", f"{res['served_over_offline']:.2f}"),
            ("(a) forwards; texts, tokens per forward",
             f"{forwards:.0f}; {res['texts_per_forward']:.1f}, {res['tokens_per_forward']:.0f}"),
            (f"(b) {lat_tokens}-token request, idle server: p50 / p99 ms ({n_latency} requests)",
             f"{res['latency_p50_ms']:.1f} / {res['latency_p99_ms']:.1f}"),
            ("SIGTERM exit status", str(rc))]
    print(f"\n| {res['device']} | |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serve.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    return 0 if rc == 0 and n_err == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
