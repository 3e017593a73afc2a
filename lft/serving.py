"""serve.py's HTTP worker processes: request checks, tokenising, the two wire formats, metrics, drain.

    worker_main(sock, conn, settings, labels, thresholds)   # a process lft/engine.py starts

Each worker runs uvicorn (uvloop, httptools) with the FastAPI app on the socket the model process bound;
the kernel hands each new connection to one of them. A request is read, checked and tokenised here, then
its token ids go down this worker's pipe to the model process (lft/engine.py), which batches the texts of all
workers by tokens and answers with probabilities; labels, thresholds and the response shapes are done here:

    handler:  body -> texts -> token ids (inline, or a thread for long requests) -> EngineClient.submit ->
              await the future -> response

The workers import neither torch nor transformers: they encode with the tokenizer the model process loaded,
which it sends them as JSON when the model is ready (until then /health answers 503). Metrics of all the
processes meet in prometheus_client's multiprocess directory; /metrics on any worker shows the sum.
"""
import asyncio
import contextlib
import hmac
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .common import UserError
from .labels import choose_labels

ROUTES = ("/predict", "/classify", "/v1/classify", "/health", "/info", "/metrics")
OPENAI_ROUTES = ("/classify", "/v1/classify")
OPEN_ROUTES = ("/health", "/metrics")  # no key needed: probes and scrapers; they show no text and no key


@dataclass(frozen=True)
class Settings:
    """The serving flags of serve.py, as the processes use them."""
    model_name: str
    host: str = "127.0.0.1"
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    max_texts_per_request: int = 256
    max_chars_per_text: int = 20000
    max_body_bytes: int = 2 << 20
    max_concurrent_requests: int = 512  # over all workers
    drain_timeout_s: float = 30.0
    tokenizer_threads: int = 2  # per worker
    http_workers: int = 1
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


class Encoder:
    """The model's tokenizer in a worker: the `tokenizers` backend that qwen3_classification_direct.load_tokenizer
    made in the model process (every added token special, special tokens split: no string a user types becomes
    a control token), rebuilt from its JSON. Encodes as Classifier.token_ids does."""

    def __init__(self, tokenizer_json: str, pad_id: int, max_length: int):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        tok.encode_special_tokens = True  # a setting, not part of the JSON
        tok.no_truncation()
        tok.no_padding()
        self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: the same ids, no offsets
        self.pad_id, self.max_length = pad_id, max_length

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Every token id of each text, none cut. Safe from several threads."""
        return [e.ids for e in self._encode(texts, add_special_tokens=False)] if texts else []

    def cut(self, ids: list[list[int]]) -> list[list[int]]:
        """Each text's first max_length ids (a text that tokenises to nothing reads as one pad token)."""
        return [x[:self.max_length] or [self.pad_id] for x in ids]

    def encode(self, texts: list[str], truncate: bool, field_name: str = "inputs") -> list[list[int]]:
        """Token ids per text. A text over max_length tokens keeps its first max_length tokens with `truncate`,
        else is refused with its index."""
        ids = self.token_ids(texts)
        if not truncate:
            for i, x in enumerate(ids):
                if len(x) > self.max_length:
                    raise ApiError(413, f"`{field_name}[{i}]` has {len(x)} tokens; this model reads at most "
                                        f"{self.max_length}: send \"truncate\": true to keep the first "
                                        f"{self.max_length}")
        return self.cut(ids)


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
    """Prometheus metrics (names start with lft_serve_). Under serve.py every process writes them into the
    PROMETHEUS_MULTIPROC_DIR the model process made, and render() sums them; gauges over live processes."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # no *_created series: they double the page and no dashboard reads them
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        r = self.registry = CollectorRegistry()
        if not self.multiprocess:
            ProcessCollector(registry=r)

        def gauge(name, doc):
            return Gauge(name, doc, registry=r, multiprocess_mode="livesum")
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
        self.queue_texts = gauge("lft_serve_queue_texts", "texts waiting for the model")
        self.queue_tokens = gauge("lft_serve_queue_tokens", "tokens waiting for the model")
        self.in_flight = gauge("lft_serve_requests_in_flight", "classification requests being handled")
        self.texts = Counter("lft_serve_texts", "texts classified", registry=r)
        self.tokens = Counter("lft_serve_tokens", "real tokens classified", registry=r)

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)


# --- a worker: its state, and its side of the pipe to the model process -------------------------------------

class Front:
    """What this worker's routes share: settings, labels, thresholds, state, and the model's answers."""

    def __init__(self, settings: Settings, labels: list[str], thresholds: dict[int, float], conn):
        self.s, self.labels, self.thresholds = settings, list(labels), thresholds
        self.metrics = Metrics()
        self.state = "loading"  # -> ready -> draining; or failed
        self.info: dict = {}
        self.encoder: Encoder | None = None
        self.in_flight = 0
        self.max_in_flight = max(1, -(-settings.max_concurrent_requests // settings.http_workers))
        self.drain_deadline = math.inf
        self.pool = ThreadPoolExecutor(max_workers=settings.tokenizer_threads, thread_name_prefix="tokenize")
        self.conn = conn
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0

    # the pipe: requests go down from the event loop; a reader thread brings answers and state changes back
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        threading.Thread(target=self._read, name="pipe", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the model process is gone
                msg = ("failed",)
            self.loop.call_soon_threadsafe(self._on_message, msg)
            if msg[0] == "failed":
                return

    def _on_message(self, msg) -> None:
        kind = msg[0]
        if kind == "done":
            for key, probs, error in msg[1]:
                fut = self._pending.pop(key, None)
                if fut is not None and not fut.done():
                    fut.set_exception(ApiError(*error)) if error is not None else fut.set_result(probs)
        elif kind == "ready":
            info, tokenizer_json, pad_id, max_length = msg[1:]
            self.encoder = Encoder(tokenizer_json, pad_id, max_length)
            self.info = info
            if self.state == "loading":
                self.state = "ready"
            self.conn.send(("ready",))
        elif kind == "drain":
            self.start_drain()
        elif kind == "failed":
            self.state = "failed"
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ApiError(503, "the model process stopped"))
            self._pending.clear()

    async def classify(self, ids: list[list[int]]) -> np.ndarray:
        """(n, num_labels) probabilities of these texts from the model process."""
        self._next += 1
        key, fut = self._next, self.loop.create_future()
        self._pending[key] = fut
        try:
            self.conn.send(("job", key, ids))
        except OSError:  # the model process is gone (this worker is about to exit)
            self._pending.pop(key, None)
            raise ApiError(503, "the model process stopped") from None
        try:
            return await fut
        except asyncio.CancelledError:  # the client went away: its texts need not run
            if self._pending.pop(key, None) is not None:
                with contextlib.suppress(OSError):
                    self.conn.send(("cancel", key))
            raise

    def start_drain(self) -> None:
        if self.state in ("loading", "ready"):
            self.state = "draining"
            self.drain_deadline = time.monotonic() + self.s.drain_timeout_s

    def drained(self) -> bool:
        return self.state == "failed" or \
            self.state == "draining" and (self.in_flight == 0 or time.monotonic() > self.drain_deadline)


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


def make_app(front: Front):
    """The FastAPI app; bodies are read and checked by hand (limits, messages naming the field)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    s = front.s
    app = FastAPI(title="lft classifier", docs_url=None, redoc_url=None, openapi_url=None)

    def authorise(request) -> None:
        check_api_key(request, s.api_key)

    async def read_json(request):
        return parse_json(await read_body(request, s.max_body_bytes))

    async def classify_texts(request: Request, route: str, parse):
        """The shared path of both formats: auth, state, body, tokens, the queue."""
        authorise(request)
        if front.state != "ready":
            raise ApiError(503, "the model is still loading" if front.state == "loading" else
                           "the server is shutting down" if front.state == "draining" else "the model failed")
        if front.in_flight >= front.max_in_flight:
            raise ApiError(429, f"{front.in_flight} requests in flight on this worker, the most it takes "
                                "(--max_concurrent_requests over --http_workers): retry later")
        front.in_flight += 1
        front.metrics.in_flight.inc()
        try:
            texts, single, *opts = parse(await read_json(request), s)
            truncate = opts[1] if opts else True  # /classify keeps the first max_length tokens, as training did
            loop = asyncio.get_running_loop()
            field = "input" if route in OPENAI_ROUTES else "inputs"
            if sum(map(len, texts)) <= INLINE_TOKENISE_CHARS:  # a thread hop costs more than tokenising this
                ids = front.encoder.encode(texts, truncate, field)
            else:
                ids = await loop.run_in_executor(front.pool, front.encoder.encode, texts, truncate, field)
            P = await front.classify(ids)
        finally:
            front.in_flight -= 1
            front.metrics.in_flight.dec()
        return P, choose_labels(P, front.thresholds), single, opts, sum(map(len, ids))

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
        out = [tei_scores(p, int(k), front.labels, raw) for p, k in zip(P, chosen)]
        return out[0] if single else out

    def classify(route):
        async def work(request: Request):
            P, chosen, _, _, n_tokens = await classify_texts(request, route, parse_classify)
            return vllm_response(P, chosen, front.labels, s.model_name, n_tokens)
        return work

    async def info(request: Request):
        authorise(request)
        if not front.info:
            raise ApiError(503, f"the model is {front.state}")
        return front.info

    app.add_api_route("/predict", answer("/predict", predict), methods=["POST"])
    for route in OPENAI_ROUTES:
        app.add_api_route(route, answer(route, classify(route)), methods=["POST"])
    app.add_api_route("/info", answer("/info", info), methods=["GET"])

    @app.get("/health")
    async def health():
        ok = front.state == "ready"
        return JSONResponse({"status": "ok" if ok else front.state}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(front.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return MetricsMiddleware(app, front.metrics)


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


# --- a worker process -------------------------------------------------------------------------------------

INLINE_TOKENISE_CHARS = 2000  # requests up to this many characters are tokenised on the event loop (~0.1 ms)


def worker_main(sock, conn, settings: Settings, labels: list[str], thresholds: dict[int, float]) -> None:
    """An HTTP worker process (lft/engine.py starts it): uvicorn on `sock` until drained or the model process
    stops. Ctrl-C is the model process's to act on (it tells every worker to drain); SIGTERM sent to a worker
    alone drains that worker, and the model process then drains the rest."""
    import uvicorn

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    front = Front(settings, labels, thresholds, conn)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # uvicorn's would re-raise the signal after shutdown
            if sig != signal.SIGINT:
                front.start_drain()

        async def startup(self, sockets=None):
            front.start(asyncio.get_running_loop())
            await super().startup(sockets=sockets)

        async def on_tick(self, counter: int) -> bool:
            if front.drained():
                self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(make_app(front), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=settings.drain_timeout_s)
    server = Server(config)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(server.serve(sockets=[sock]))
    finally:
        front.pool.shutdown(wait=False, cancel_futures=True)
    sys.exit(0)


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
