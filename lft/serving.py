"""HTTP serving: request parsing, token-budget dynamic batching, metrics, the app and its lifecycle (serve.py).

    service = Service(settings, labels, thresholds)
    run(service, sock, load)        # serves until SIGTERM/Ctrl-C; `load()` returns a Classifier

One model worker thread owns the model from loading to exit; the event loop never runs it. Request handlers
check and tokenise (short requests inline, longer ones in a small thread pool), put their texts into one
queue and await a future:

    handler:  body -> texts -> token ids (pool) -> Batcher.submit -> await future -> response
    worker:   wait for a first text; on an idle server it goes at once; texts that queued while a forward
              ran wait up to max_wait_ms after the first of them for the queue to fill max_batch_tokens; take
              that many texts (any number of requests) -> one Predictor.probs call (Classifier.proba_of_ids:
              packed rows on a GPU) -> resolve every request whose texts are all done

Under load the queue fills while a forward runs, so the next forward takes a full budget without waiting:
forwards per second stay bounded by the model, not by the request rate. A request larger than the budget
spans several forwards; its texts stay in order.
"""
import asyncio
import collections
import hmac
import json
import math
import signal
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .common import UserError, redact

ROUTES = ("/predict", "/classify", "/v1/classify", "/health", "/info", "/metrics")
OPENAI_ROUTES = ("/classify", "/v1/classify")
OPEN_ROUTES = ("/health", "/metrics")  # no key needed: probes and scrapers; they show no text and no key


@dataclass(frozen=True)
class Settings:
    """The serving flags of serve.py, as the app uses them."""
    model_name: str
    host: str = "127.0.0.1"
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    max_texts_per_request: int = 256
    max_chars_per_text: int = 20000
    max_body_bytes: int = 2 << 20
    max_concurrent_requests: int = 512
    drain_timeout_s: float = 30.0
    tokenizer_threads: int = 2
    api_key: str | None = field(default=None, repr=False)


# --- errors ------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """A request the server refuses: status code and a message that names the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


TEI_TYPES = {400: "Validation", 401: "Unauthorized", 404: "NotFound", 413: "Validation", 422: "Validation",
             429: "Overloaded", 500: "Backend", 503: "Unhealthy"}
OPENAI_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "BadRequestError",
                422: "BadRequestError", 429: "RateLimitError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}


def error_body(route: str, e: ApiError) -> dict:
    """TEI's shape on its routes, OpenAI's (as vLLM writes it) on /classify."""
    if route in OPENAI_ROUTES:
        return {"object": "error", "message": e.message, "type": OPENAI_TYPES.get(e.status, "BadRequestError"),
                "param": None, "code": e.status}
    return {"error": e.message, "error_type": TEI_TYPES.get(e.status, "Validation")}


# --- request parsing (pure functions) ---------------------------------------------------------------------

def _type(x) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number")


def parse_json(body: bytes):
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON ({str(e)[:120]})") from None


def _check_texts(texts: list, name: str, s: Settings) -> None:
    if not texts:
        raise ApiError(422, f"`{name}` is empty: send a text or a non-empty list of texts")
    if len(texts) > s.max_texts_per_request:
        raise ApiError(413, f"`{name}` has {len(texts)} texts; at most {s.max_texts_per_request} per request "
                            "(--max_texts_per_request): split the request")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ApiError(422, f"`{name}[{i}]` must be a string, not {_type(t)}")
        if not t:
            raise ApiError(422, f"`{name}[{i}]` is an empty string")
        if len(t) > s.max_chars_per_text:
            raise ApiError(413, f"`{name}[{i}]` has {len(t)} characters; at most {s.max_chars_per_text} "
                                "(--max_chars_per_text)")


def _flag(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(422, f"`{key}` must be true or false, not {_type(v)}")
    return v


def parse_predict(body, s: Settings) -> tuple[list[str], bool, bool, bool]:
    """TEI /predict: (texts, single, raw_scores, truncate). `inputs` is a text, a list of texts, or TEI's batch
    form [["text"], ["text"]]; a pair ["a", "b"] inside a batch is refused (this model reads one text).
    Unknown fields are ignored, as TEI does."""
    if not isinstance(body, dict):
        raise ApiError(422, f"request body must be a JSON object with `inputs`, not {_type(body)}")
    if "inputs" not in body:
        raise ApiError(422, "missing field `inputs`")
    raw, truncate = _flag(body, "raw_scores", False), _flag(body, "truncate", False)
    direction = body.get("truncation_direction", "Right")
    if direction not in ("Right", "right", None):
        raise ApiError(422, f"`truncation_direction` {direction!r} is not supported: only \"Right\" "
                            "(the first max_length tokens are kept, as in training)")
    inputs = body["inputs"]
    if isinstance(inputs, str):
        texts, single = [inputs], True
    elif isinstance(inputs, list):
        texts, single = [], False
        for i, x in enumerate(inputs):
            if isinstance(x, list):
                if len(x) == 2:
                    raise ApiError(422, f"`inputs[{i}]` is a pair of texts; this model classifies single texts: "
                                        "send [\"text\", ...] or [[\"text\"], ...]")
                if len(x) != 1:
                    raise ApiError(422, f"`inputs[{i}]` must be a text or a one-text list [\"text\"], "
                                        f"not a list of {len(x)}")
                x = x[0]
            texts.append(x)
    else:
        raise ApiError(422, f"`inputs` must be a string or a list of strings, not {_type(inputs)}")
    _check_texts(texts, "inputs", s)
    return texts, single, raw, truncate


def parse_classify(body, s: Settings) -> tuple[list[str], bool]:
    """vLLM /classify: (texts, single). `input` is a text or a list of texts; `model`, when given, must name
    this model. Token-id input is refused; other fields are ignored."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object with `input`, not {_type(body)}")
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise ApiError(400, f"`model` must be a string, not {_type(model)}")
        if model != s.model_name:
            raise ApiError(404, f"The model `{model}` does not exist. This server serves `{s.model_name}`.")
    if "input" not in body:
        raise ApiError(400, "missing field `input`")
    inputs = body["input"]
    if isinstance(inputs, str):
        texts, single = [inputs], True
    elif isinstance(inputs, list):
        if inputs and all(isinstance(x, int) and not isinstance(x, bool) for x in inputs) or \
                any(isinstance(x, list) for x in inputs):
            raise ApiError(400, "`input` as token ids is not accepted: send text (a string or a list of strings)")
        texts, single = inputs, False
    else:
        raise ApiError(400, f"`input` must be a string or a list of strings, not {_type(inputs)}")
    try:
        _check_texts(texts, "input", s)
    except ApiError as e:
        raise ApiError(400 if e.status == 422 else e.status, e.message) from None
    return texts, single


def encode(clf, texts: list[str], truncate: bool, field_name: str = "inputs") -> list[list[int]]:
    """Token ids per text (in a worker thread: the tokenizer releases the GIL). A text over max_length
    tokens keeps its first max_length tokens with `truncate`, else is refused with its index."""
    ids = clf.token_ids(texts)
    if not truncate:
        for i, x in enumerate(ids):
            if len(x) > clf.max_length:
                raise ApiError(413, f"`{field_name}[{i}]` has {len(x)} tokens; this model reads at most "
                                    f"{clf.max_length}: send \"truncate\": true to keep the first {clf.max_length}")
    return clf.cut(ids)


# --- output shapes ----------------------------------------------------------------------------------------

def tei_scores(p: np.ndarray, chosen: int, labels: list[str], raw_scores: bool) -> list[dict]:
    """[{label, score}, ...] high to low, the chosen label first (it differs from the argmax only under
    --threshold). raw_scores: log-probabilities, i.e. the logits up to a per-text constant."""
    order = [int(k) for k in np.argsort(-p, kind="stable")]
    order.remove(chosen)
    order.insert(0, chosen)
    scores = np.log(np.maximum(p.astype(np.float64), 1e-45)) if raw_scores else p
    return [{"label": labels[k], "score": float(scores[k])} for k in order]


def vllm_response(P: np.ndarray, chosen: np.ndarray, labels: list[str], model: str, n_tokens: int) -> dict:
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "label": labels[int(k)], "probs": [float(x) for x in p],
                      "num_classes": len(labels)} for i, (p, k) in enumerate(zip(P, chosen))],
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}}


# --- metrics ----------------------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics in a registry of their own (names start with lft_serve_)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # no *_created series: they double the page and no dashboard reads them
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter("lft_serve_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.errors = Counter("lft_serve_request_errors", "HTTP requests answered with status >= 400",
                              ["route", "status"], registry=r)
        self.latency = Histogram("lft_serve_request_duration_seconds", "time from request to response", ["route"],
                                 buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30, 60), registry=r)
        self.batch_texts = Histogram("lft_serve_batch_texts", "texts per model forward (one Predictor.probs call)",
                                     buckets=[2 ** k for k in range(13)], registry=r)
        self.batch_tokens = Histogram("lft_serve_batch_tokens", "real tokens per model forward",
                                      buckets=[2 ** k for k in range(4, 18)], registry=r)
        self.forward_seconds = Histogram("lft_serve_forward_seconds", "time of one model forward",
                                         buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5), registry=r)
        self.queue_texts = Gauge("lft_serve_queue_texts", "texts waiting for the model", registry=r)
        self.queue_tokens = Gauge("lft_serve_queue_tokens", "tokens waiting for the model", registry=r)
        self.in_flight = Gauge("lft_serve_requests_in_flight", "classification requests being handled", registry=r)
        self.texts = Counter("lft_serve_texts", "texts classified", registry=r)
        self.tokens = Counter("lft_serve_tokens", "real tokens classified", registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --- the batcher ------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Job:
    ids: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    probs: list = field(default_factory=list)
    left: int = 0
    failed: bool = False

    def gone(self) -> bool:  # the client went away (future cancelled) or an earlier forward failed
        return self.failed or self.future.done()


def _resolve(fut: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    if not fut.done():
        fut.set_exception(error) if error is not None else fut.set_result(value)


INLINE_TOKENISE_CHARS = 2000  # requests up to this many characters are tokenised on the event loop (~0.1 ms)


class Batcher:
    """One queue of texts from every request; the model worker takes up to `max_tokens` of them per forward."""

    def __init__(self, max_tokens: int, max_wait_s: float, metrics: Metrics):
        self.max_tokens, self.max_wait_s, self.m = max_tokens, max_wait_s, metrics
        self._q: collections.deque = collections.deque()  # (job, k, n_tokens, t_queued)
        self._tokens = 0
        self._cv = threading.Condition()
        self._stop = False

    def submit(self, ids: list[list[int]], loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """Queue one request's texts; the future gets their (n, num_labels) probabilities."""
        job = _Job(ids, loop, loop.create_future(), [None] * len(ids), len(ids))
        now = time.monotonic()
        with self._cv:
            for k, x in enumerate(ids):
                self._q.append((job, k, len(x), now))
            self._tokens += sum(map(len, ids))
            self._gauges()
            self._cv.notify()
        return job.future

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
                    if not item[0].gone():
                        items.append(item)
                        total += item[2]
                self._gauges()
                if items:
                    return items

    def run(self, forward) -> None:
        """The worker loop: `forward(ids)` -> (n, num_labels) probabilities, until stop()."""
        while (items := self._take()) is not None:
            ids = [job.ids[k] for job, k, _, _ in items]
            n_tokens = sum(n for _, _, n, _ in items)
            t = time.perf_counter()
            try:
                P = forward(ids)
            except Exception as e:  # a failed forward fails its requests, not the server
                traceback.print_exc()
                err = ApiError(500, f"the model failed on this batch: {type(e).__name__}: {str(e)[:200]}")
                for job in {id(j): j for j, _, _, _ in items}.values():
                    job.failed = True
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, err)
                continue
            self.m.forward_seconds.observe(time.perf_counter() - t)
            self.m.batch_texts.observe(len(ids))
            self.m.batch_tokens.observe(n_tokens)
            self.m.texts.inc(len(ids))
            self.m.tokens.inc(n_tokens)
            for (job, k, _, _), p in zip(items, P):
                job.probs[k] = p
                job.left -= 1
                if job.left == 0:
                    job.loop.call_soon_threadsafe(_resolve, job.future, np.stack(job.probs))


# --- the service: model state and the routes ---------------------------------------------------------------

class Service:
    """Everything the routes share: settings, labels, thresholds, state, the classifier once loaded."""

    def __init__(self, settings: Settings, labels: list[str], thresholds: dict[int, float], info: dict | None = None,
                 t_start: float | None = None):
        self.s, self.labels, self.thresholds = settings, list(labels), thresholds
        self.static_info = info or {}
        self.t_start = t_start if t_start is not None else time.perf_counter()
        self.metrics = Metrics()
        self.batcher = Batcher(settings.max_batch_tokens, settings.max_wait_ms / 1000, self.metrics)
        self.clf = None
        self.state = "loading"  # -> ready -> draining; or failed
        self.exit_code = 0
        self.in_flight = 0
        self.drain_deadline = math.inf
        self.pool = ThreadPoolExecutor(max_workers=settings.tokenizer_threads, thread_name_prefix="tokenize")
        self.url = ""

    # the model worker thread: load, warm up, then serve the queue until stopped
    def model_worker(self, load, on_fail) -> None:
        from .predict import choose_labels  # noqa: F401  (torch is loaded here, not at import)

        try:
            t0 = time.perf_counter()
            clf = load()
            t1 = time.perf_counter()
            self.warm_up(clf)
            t2 = time.perf_counter()
        except UserError as e:
            print(f"error: {' '.join(redact(e).split())}", file=sys.stderr, flush=True)
            self.state, self.exit_code = "failed", 2
            on_fail()
            return
        except BaseException:
            traceback.print_exc()
            self.state, self.exit_code = "failed", 1
            on_fail()
            return
        self.clf = clf
        if self.state == "loading":
            self.state = "ready"
        print(f"ready in {t2 - self.t_start:.1f} s (load {t1 - t0:.1f} s, warm-up {t2 - t1:.1f} s) on {self.url}",
              flush=True)
        self.batcher.run(clf.proba_of_ids)

    def warm_up(self, clf) -> None:
        """One short text and one full token budget, twice each (a row shape is compiled on its first use and
        captured as a CUDA graph on its second): first-use costs are paid before the first request, not by it."""
        n = max(1, self.s.max_batch_tokens // clf.max_length)
        for ids in ([[clf.tokenizer.pad_token_id] * 8], [[clf.tokenizer.pad_token_id] * clf.max_length] * n):
            for _ in range(2):
                clf.proba_of_ids(ids)

    def info(self) -> dict:
        clf, rt = self.clf, self.clf.runtime
        meta = clf.meta
        return {"model_id": self.s.model_name, "model_identity": clf.identity, "labels": self.labels,
                "num_labels": len(self.labels), "max_length": clf.max_length, "pooling": meta.get("pooling"),
                "precision": rt.precision, "quantize": getattr(clf, "quantize", "none"), "device": str(rt.device),
                "packing": rt.packing, "attention": rt.attn,
                "cuda_graphs": rt.eval_graphs, "base": meta.get("base", {}).get("name"),
                "base_architecture_sha256": meta.get("base", {}).get("architecture_sha256"),
                "thresholds": {self.labels[k]: v for k, v in sorted(self.thresholds.items())},
                "max_batch_tokens": self.s.max_batch_tokens, "max_wait_ms": self.s.max_wait_ms,
                "max_texts_per_request": self.s.max_texts_per_request,
                "max_chars_per_text": self.s.max_chars_per_text, "max_body_bytes": self.s.max_body_bytes,
                "max_concurrent_requests": self.s.max_concurrent_requests, "version": version(),
                **self.static_info}

    def start_drain(self) -> None:
        if self.state != "draining":
            print(f"draining: {self.in_flight} request(s) in flight; /health answers 503", flush=True)
            self.state = "draining"
            self.drain_deadline = time.monotonic() + self.s.drain_timeout_s

    def drained(self) -> bool:
        return self.state in ("draining", "failed") and (self.in_flight == 0 or time.monotonic() > self.drain_deadline)


def check_api_key(request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (compared in constant time)."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`")


async def read_body(request, limit: int) -> bytes:
    """The request body, or 413 past `limit` bytes. An oversized body is read (and dropped) up to a cap, so the
    client gets the 413 instead of a reset connection."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n <= limit:
            chunks.append(chunk)
        elif n > limit + (64 << 20):
            break
    if too_big or n > limit:
        raise ApiError(413, f"request body has {max(n, int(declared or 0))} bytes; at most {limit} "
                            "(--max_body_bytes)")
    return b"".join(chunks)


def event_loop_factory():
    """uvloop's event loop where it is installed (requirements.txt; it about halves the HTTP cost of a request
    next to asyncio's), else asyncio's. uvicorn then parses HTTP with httptools, also pinned."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def make_app(service: Service):
    """The FastAPI app; bodies are read and checked by hand (limits, messages naming the field)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    from .predict import choose_labels

    s = service.s
    app = FastAPI(title="lft classifier", docs_url=None, redoc_url=None, openapi_url=None)

    def authorise(request) -> None:
        check_api_key(request, s.api_key)

    async def read_json(request):
        return parse_json(await read_body(request, s.max_body_bytes))

    async def classify_texts(request: Request, route: str, parse):
        """The shared path of both formats: auth, state, body, tokens, the queue."""
        authorise(request)
        if service.state != "ready":
            raise ApiError(503, "the model is still loading" if service.state == "loading" else
                           "the server is shutting down" if service.state == "draining" else "the model failed")
        if service.in_flight >= s.max_concurrent_requests:
            raise ApiError(429, f"{service.in_flight} requests in flight, the most this server takes "
                                "(--max_concurrent_requests): retry later")
        service.in_flight += 1
        service.metrics.in_flight.inc()
        try:
            texts, single, *opts = parse(await read_json(request), s)
            truncate = opts[1] if opts else True  # /classify keeps the first max_length tokens, as training did
            loop = asyncio.get_running_loop()
            field = "input" if route in OPENAI_ROUTES else "inputs"
            if sum(map(len, texts)) <= INLINE_TOKENISE_CHARS:  # a thread hop costs more than tokenising this
                ids = encode(service.clf, texts, truncate, field)
            else:
                ids = await loop.run_in_executor(service.pool, encode, service.clf, texts, truncate, field)
            P = await service.batcher.submit(ids, loop)
        finally:
            service.in_flight -= 1
            service.metrics.in_flight.dec()
        return P, choose_labels(P, service.thresholds), single, opts, sum(map(len, ids))

    def answer(route: str, work):
        async def handler(request: Request):
            try:
                return JSONResponse(await work(request))
            except ApiError as e:
                headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
                return JSONResponse(error_body(route, e), status_code=e.status, headers=headers)
        return handler

    async def predict(request: Request):
        P, chosen, single, (raw, _), _ = await classify_texts(request, "/predict", parse_predict)
        out = [tei_scores(p, int(k), service.labels, raw) for p, k in zip(P, chosen)]
        return out[0] if single else out

    def classify(route):
        async def work(request: Request):
            P, chosen, _, _, n_tokens = await classify_texts(request, route, parse_classify)
            return vllm_response(P, chosen, service.labels, s.model_name, n_tokens)
        return work

    async def info(request: Request):
        authorise(request)
        if service.clf is None:
            raise ApiError(503, f"the model is {service.state}")
        return service.info()

    app.add_api_route("/predict", answer("/predict", predict), methods=["POST"])
    for route in OPENAI_ROUTES:
        app.add_api_route(route, answer(route, classify(route)), methods=["POST"])
    app.add_api_route("/info", answer("/info", info), methods=["GET"])

    @app.get("/health")
    async def health():
        ok = service.state == "ready"
        return JSONResponse({"status": "ok" if ok else service.state}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return MetricsMiddleware(app, service.metrics)


class MetricsMiddleware:
    """Counts every HTTP request by route and status and times it (pure ASGI: no per-request task)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.m = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status, t = [500], time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            code = str(status[0])
            self.m.requests.labels(route, code).inc()
            if status[0] >= 400:
                self.m.errors.labels(route, code).inc()
            self.m.latency.labels(route).observe(time.perf_counter() - t)


# --- lifecycle --------------------------------------------------------------------------------------------

def run(service: Service, sock, load) -> int:
    """Serve on the bound socket `sock` until SIGTERM/Ctrl-C; the model loads in the worker thread meanwhile.
    SIGTERM: /health turns 503, new classification requests get 503, in-flight ones finish (at most
    --drain_timeout), then exit 0. A second Ctrl-C exits at once."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # uvicorn's would re-raise the signal after shutdown: exit 0 instead
            if service.state == "draining" and sig == signal.SIGINT:
                self.force_exit = self.should_exit = True
            service.start_drain()

        async def on_tick(self, counter: int) -> bool:
            if service.drained():
                self.should_exit = True
            return await super().on_tick(counter)

    host, port = sock.getsockname()[:2]
    service.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    config = uvicorn.Config(make_app(service), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=service.s.drain_timeout_s)
    server = Server(config)
    print(f"loading the model; listening on {service.url} (/health answers 503 until ready)", flush=True)
    worker = threading.Thread(target=service.model_worker, name="model",
                              args=(load, lambda: setattr(server, "should_exit", True)), daemon=True)
    worker.start()
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(server.serve(sockets=[sock]))
    finally:
        service.batcher.stop()
        service.pool.shutdown(wait=False, cancel_futures=True)
        if service.state != "loading":  # let the worker leave torch before the interpreter shuts down
            worker.join(timeout=10)
    if service.exit_code == 0:
        print("stopped", flush=True)
    return service.exit_code


def bind(host: str, port: int):
    """The listening socket, bound before the model loads: a taken port is a one-line error in a second."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP, and
    # with Nagle on, a response written as headers + body waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                        "pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def version() -> str:
    from . import __version__

    return __version__

