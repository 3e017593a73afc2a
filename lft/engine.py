"""serve.py's model process: it holds the model once, batches the texts of every HTTP worker by tokens, and
supervises the workers (lft/serving.py).

    run(settings, labels, thresholds, info, t_start, sock, load)   # until SIGTERM/Ctrl-C; load() -> Classifier

Processes and threads (vLLM splits its API server from its engine the same way, for the same reason: one
Python process tops out near 700 HTTP requests/s, bench/RESULTS.md run 8):

    HTTP worker k (a process, lft/serving.py: uvicorn on the shared socket): parse, check and tokenise a
        request -> ("job", id, token ids) down its pipe -> await the answer
    model process, a reader thread per worker: job -> Batcher.submit
    model process, the model thread: load, warm up, then the Batcher's loop: take up to max_batch_tokens of
        queued texts (any workers, any requests) -> one Classifier.proba_of_ids -> ("done", [(id, probs)...]),
        one message per worker per forward
    model process, the main thread: signals and the workers' lives

The model process tells the workers its state: ("ready", info, tokenizer JSON, pad id, max_length) once warm
(the workers encode with exactly the tokenizer the model process loaded, so no worker imports torch), then
("drain",) on SIGTERM or Ctrl-C, or ("failed",) if the model cannot load. A worker that exits with an error
stops the whole server (exit 1: a supervisor such as systemd restarts it whole).
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import numpy as np

from .common import UserError, redact


# --- the batcher ------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Job:
    """One request's texts: `sink.put(key, probs, error)` once all are done or one forward failed."""
    ids: list[list[int]]
    sink: object
    key: object
    probs: list = field(default_factory=list)
    left: int = 0
    failed: bool = False  # the client went away, or a forward that held some of its texts failed


class Batcher:
    """One queue of texts from every request; the model thread takes up to `max_tokens` of them per forward."""

    def __init__(self, max_tokens: int, max_wait_s: float, metrics):
        self.max_tokens, self.max_wait_s, self.m = max_tokens, max_wait_s, metrics
        self._q: collections.deque = collections.deque()  # (job, k, n_tokens, t_queued)
        self._tokens = 0
        self._cv = threading.Condition()
        self._stop = False

    def submit(self, ids: list[list[int]], sink, key) -> Job:
        """Queue one request's texts; `sink.put(key, (n, num_labels) probabilities, None)` follows."""
        job = Job(ids, sink, key, [None] * len(ids), len(ids))
        now = time.monotonic()
        with self._cv:
            for k, x in enumerate(ids):
                self._q.append((job, k, len(x), now))
            self._tokens += sum(map(len, ids))
            self._gauges()
            self._cv.notify()
        return job

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()

    def _gauges(self) -> None:
        self.m.queue_texts.set(len(self._q))
        self.m.queue_tokens.set(self._tokens)

    def _take(self) -> list | None:
        """Take texts in order while they fit the token budget (always at least one). On an idle server the
        first text goes at once (no batching delay for a lone request); texts that queued while the model was
        busy wait up to max_wait after the first of them for the budget to fill."""
        with self._cv:
            while True:
                idle = not self._q
                while not self._q and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return None
                deadline = self._q[0][3] + (0.0 if idle else self.max_wait_s)
                while self._tokens < self.max_tokens and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                items, total = [], 0
                while self._q and (not items or total + self._q[0][2] <= self.max_tokens):
                    item = self._q.popleft()
                    self._tokens -= item[2]
                    if not item[0].failed:
                        items.append(item)
                        total += item[2]
                self._gauges()
                if items:
                    return items

    def run(self, forward) -> None:
        """The model thread's loop: `forward(ids)` -> (n, num_labels) probabilities, until stop(). After each
        forward every sink that got an answer is flushed once."""
        while (items := self._take()) is not None:
            ids = [job.ids[k] for job, k, _, _ in items]
            n_tokens = sum(n for _, _, n, _ in items)
            sinks = {id(job.sink): job.sink for job, _, _, _ in items}.values()
            t = time.perf_counter()
            try:
                P = forward(ids)
            except Exception as e:  # a failed forward fails its requests, not the server
                traceback.print_exc()
                err = (500, f"the model failed on this batch: {type(e).__name__}: {str(e)[:200]}")
                for job in {id(j): j for j, _, _, _ in items}.values():
                    job.failed = True
                    job.sink.put(job.key, None, err)
            else:
                self.m.forward_seconds.observe(time.perf_counter() - t)
                self.m.batch_texts.observe(len(ids))
                self.m.batch_tokens.observe(n_tokens)
                self.m.texts.inc(len(ids))
                self.m.tokens.inc(n_tokens)
                for (job, k, _, _), p in zip(items, P):
                    job.probs[k] = p
                    job.left -= 1
                    if job.left == 0:
                        job.sink.put(job.key, np.stack(job.probs), None)
            for sink in sinks:
                sink.flush()


# --- the model process's side of each worker's pipe ---------------------------------------------------------

class Worker:
    """One HTTP worker process, its pipe, and the answers waiting to go down it."""

    def __init__(self, index: int, process, conn):
        self.index, self.process, self.conn = index, process, conn
        self.jobs: dict[int, Job] = {}  # job id -> Job, until answered (a cancel marks it failed)
        self.ready = threading.Event()  # the worker has built its tokenizer and serves
        self._out: list = []
        self._lock = threading.Lock()

    def put(self, key: int, probs, error) -> None:  # the model thread
        self.jobs.pop(key, None)
        self._out.append((key, probs, error))

    def flush(self) -> None:  # the model thread, once per forward
        if self._out:
            out, self._out = self._out, []
            self.send(("done", out))

    def send(self, message) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except OSError:  # the worker is gone; the main thread sees it exit
                pass

    def read(self, batcher: Batcher) -> None:
        """This worker's reader thread: its jobs into the batcher, until its pipe closes."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                return
            kind = msg[0]
            if kind == "job":
                self.jobs[msg[1]] = batcher.submit(msg[2], self, msg[1])
            elif kind == "cancel":
                job = self.jobs.pop(msg[1], None)
                if job is not None:
                    job.failed = True
            elif kind == "ready":
                self.ready.set()


class Engine:
    """The model process: the classifier, the batcher, the workers."""

    def __init__(self, settings, metrics, workers: list[Worker], t_start: float, url: str):
        self.s, self.workers, self.t_start, self.url = settings, workers, t_start, url
        self.batcher = Batcher(settings.max_batch_tokens, settings.max_wait_ms / 1000, metrics)
        self.state = "loading"  # -> ready -> draining; or failed
        self.exit_code = 0
        self.loaded = False  # the model thread holds a model (it must leave torch before the process exits)

    def broadcast(self, message) -> None:
        for w in self.workers:
            w.send(message)

    def model_thread(self, load, labels: list[str], thresholds: dict[int, float], static_info: dict) -> None:
        """Load and warm up the model, hand the workers what they need, then run the batcher until stopped."""
        try:
            t0 = time.perf_counter()
            clf = load()
            t1 = time.perf_counter()
            warm_up(clf, self.s.max_batch_tokens)
            t2 = time.perf_counter()
        except UserError as e:
            print(f"error: {' '.join(redact(e).split())}", file=sys.stderr, flush=True)
            self._fail(2)
            return
        except BaseException:
            traceback.print_exc()
            self._fail(1)
            return
        self.loaded = True
        if self.state != "loading":  # SIGTERM while loading: the workers are gone or going
            return
        info = model_info(clf, self.s, labels, thresholds, static_info)
        self.broadcast(("ready", info, clf.tokenizer.backend_tokenizer.to_str(), clf.tokenizer.pad_token_id,
                        clf.max_length))
        for w in self.workers:  # each builds its tokenizer (well under a second), then answers
            while not w.ready.wait(0.5) and w.process.is_alive() and self.state == "loading":
                pass
        if self.state == "loading":
            self.state = "ready"
            print(f"ready in {time.perf_counter() - self.t_start:.1f} s (load {t1 - t0:.1f} s, warm-up "
                  f"{t2 - t1:.1f} s) on {self.url}", flush=True)
        self.batcher.run(clf.proba_of_ids)

    def _fail(self, code: int) -> None:
        self.state, self.exit_code = "failed", code
        self.broadcast(("failed",))

    def drain(self) -> None:
        if self.state in ("loading", "ready"):
            print("draining: /health answers 503; requests in flight finish", flush=True)
            self.state = "draining"
            self.broadcast(("drain",))


def warm_up(clf, max_batch_tokens: int) -> None:
    """One short text and one full token budget, twice each (a row shape is compiled on its first use and
    captured as a CUDA graph on its second): first-use costs are paid before the first request, not by it."""
    n = max(1, max_batch_tokens // clf.max_length)
    for ids in ([[clf.tokenizer.pad_token_id] * 8], [[clf.tokenizer.pad_token_id] * clf.max_length] * n):
        for _ in range(2):
            clf.proba_of_ids(ids)


def model_info(clf, s, labels: list[str], thresholds: dict[int, float], static_info: dict) -> dict:
    """What GET /info answers."""
    from . import __version__

    rt, meta = clf.runtime, clf.meta
    return {"model_id": s.model_name, "model_identity": clf.identity, "labels": list(labels),
            "num_labels": len(labels), "max_length": clf.max_length, "pooling": meta.get("pooling"),
            "precision": rt.precision, "quantize": getattr(clf, "quantize", "none"), "device": str(rt.device),
            "packing": rt.packing, "attention": rt.attn, "cuda_graphs": rt.eval_graphs,
            "base": meta.get("base", {}).get("name"),
            "base_architecture_sha256": meta.get("base", {}).get("architecture_sha256"),
            "thresholds": {labels[k]: v for k, v in sorted(thresholds.items())},
            "max_batch_tokens": s.max_batch_tokens, "max_wait_ms": s.max_wait_ms,
            "max_texts_per_request": s.max_texts_per_request, "max_chars_per_text": s.max_chars_per_text,
            "max_body_bytes": s.max_body_bytes, "max_concurrent_requests": s.max_concurrent_requests,
            "http_workers": s.http_workers, "version": __version__, **static_info}


# --- lifecycle --------------------------------------------------------------------------------------------

def run(settings, labels: list[str], thresholds: dict[int, float], static_info: dict, t_start: float, sock,
        load) -> int:
    """Serve on the bound socket `sock` until SIGTERM/Ctrl-C; the model loads meanwhile (the workers answer
    /health with 503 until it is ready). SIGTERM or Ctrl-C: every worker turns /health to 503, refuses new
    classification requests with 503 and finishes the ones in flight (at most --drain_timeout), then the
    process exits 0. A second Ctrl-C exits at once (130)."""
    from . import serving

    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    metrics_dir = tempfile.mkdtemp(prefix="lft_serve_metrics_")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before prometheus_client loads, here and in workers
    ctx = mp.get_context("spawn")  # a fork of a process that has started CUDA threads is unsafe
    workers = []
    try:
        for k in range(settings.http_workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=serving.worker_main, name=f"lft-http-{k}",
                            args=(sock, child, settings, list(labels), thresholds))
            p.start()
            child.close()
            workers.append(Worker(k, p, parent))
        return _supervise(settings, labels, thresholds, static_info, t_start, url, load, workers)
    finally:
        for w in workers:
            if w.process.is_alive():
                w.process.kill()
            w.process.join(5)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(settings, labels, thresholds, static_info, t_start, url, load, workers: list[Worker]) -> int:
    from .serving import Metrics

    from prometheus_client import multiprocess

    engine = Engine(settings, Metrics(), workers, t_start, url)
    print(f"loading the model; listening on {url} with {len(workers)} HTTP worker process(es) (/health answers "
          "503 until ready)", flush=True)
    for w in workers:
        threading.Thread(target=w.read, args=(engine.batcher,), name=f"pipe-{w.index}", daemon=True).start()
    model = threading.Thread(target=engine.model_thread, name="model", daemon=True,
                             args=(load, labels, thresholds, static_info))
    model.start()
    interrupts = []

    def on_signal(sig, frame):
        interrupts.append(sig)
        engine.drain()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        alive = list(workers)
        while alive:
            if interrupts.count(signal.SIGINT) >= 2:  # a second Ctrl-C: now
                print("stopped at once (second Ctrl-C)", flush=True)
                return 130
            done = wait([w.process.sentinel for w in alive], timeout=0.2)
            for w in [w for w in alive if w.process.sentinel in done]:
                w.process.join()
                alive.remove(w)
                multiprocess.mark_process_dead(w.process.pid)
                code = w.process.exitcode
                if code != 0 and engine.state != "failed":  # a crash (an exit 0 is a drained worker)
                    print(f"error: HTTP worker {w.index} exited with {code}; stopping the server",
                          file=sys.stderr, flush=True)
                    engine.exit_code = 1
                engine.drain()  # one worker gone: stop the others too, gracefully
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        engine.batcher.stop()
        if engine.loaded:  # let the model thread leave torch before the interpreter shuts down
            model.join(timeout=10)
    if engine.exit_code == 0:
        print("stopped", flush=True)
    return engine.exit_code
