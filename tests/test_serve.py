"""serve.py as a real server process on 127.0.0.1 (tiny checkpoint, CPU, an adapter trained here), driven over
HTTP: both route formats and their exact shapes, dynamic batching under 64 concurrent requests (answers equal
to sequential ones and to the Classifier API), bad requests, auth, thresholds, metrics, SIGTERM drain."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import train_lora
from conftest import REPO, subprocess_env
from test_train import base_args

KEY_ENV, KEY = "LFT_TEST_SERVE_KEY", "s3cret-key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
LABELS = ["正常", "歧视", "违法违规", "政治安全", "暴恐", "色情低俗"]


class Server:
    """`python serve.py ...` on a free port; the URL comes from its ready line."""

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--port", "0", "--device", "cpu", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**subprocess_env(), **(env or {})}, cwd=REPO)
        self.lines, self.url = [], None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = re.match(r"ready in [\d.]+ s \(load [\d.]+ s, warm-up [\d.]+ s\) on (http://127\.0\.0\.1:\d+)$",
                             line.strip())
                if m:
                    self.url = m.group(1)
                    ready.set()
        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 120
        while not ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("server did not start:\n" + "\n".join(self.lines))
        self.client = httpx.Client(base_url=self.url, timeout=60,
                                   limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))

    def metrics(self) -> dict:
        """{'name{labels}': value} from /metrics."""
        out = {}
        for line in self.client.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def adapter_dir(tiny_ckpt, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    assert train_lora.main(base_args(tiny_ckpt, demo_data, out, "--num_epochs", "1", "--logging_steps", "27")) == 0
    return out / "best_model"


@pytest.fixture(scope="module")
def texts(demo_data):
    return pd.read_excel(demo_data["test"])["text_cn"].tolist()[:64]


@pytest.fixture(scope="module")
def clf(adapter_dir):
    from lft.predict import Classifier

    return Classifier.load(adapter_dir, device="cpu")


@pytest.fixture(scope="module")
def server(adapter_dir):
    s = Server("--lora_model", str(adapter_dir), "--served_model_name", "safety", "--api_key_env", KEY_ENV,
               "--max_texts_per_request", "8", "--max_chars_per_text", "300", "--max_body_bytes", "4096",
               "--http_workers", "2", "--max_wait_ms", "25", env={KEY_ENV: KEY})  # 25: texts queued behind a
    # forward wait for more on a loaded 2-core machine too (at 5 ms, 64 requests once took 18 forwards, not <= 16)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slow_server(adapter_dir):
    """One text per forward (the budget is one max_length) and a threshold that every text reaches."""
    s = Server("--lora_model", str(adapter_dir), "--max_batch_tokens", "64", "--threshold", "暴恐:0.000001",
               "--http_workers", "2")
    yield s
    s.stop()


def post(server, route, body, headers=AUTH):
    return server.client.post(route, content=json.dumps(body, ensure_ascii=False).encode(), headers=headers)


def test_shapes_of_both_formats_info_and_health(server, clf, texts):
    r = post(server, "/predict", {"inputs": texts[0]})
    assert r.status_code == 200
    one = r.json()
    assert [sorted(x) for x in one] == [["label", "score"]] * 6 and sorted(x["label"] for x in one) == sorted(LABELS)
    scores = [x["score"] for x in one]
    assert scores == sorted(scores, reverse=True) and math.isclose(sum(scores), 1, abs_tol=1e-5)
    want = clf.predict_proba([texts[0]])[0]
    assert {x["label"]: x["score"] for x in one} == pytest.approx(dict(zip(LABELS, want)), abs=1e-5)

    batch = post(server, "/predict", {"inputs": texts[:3], "unknown_field": 1}).json()  # unknown fields: ignored
    assert len(batch) == 3 and all(len(b) == 6 for b in batch)
    assert {x["label"]: x["score"] for x in batch[0]} == pytest.approx({x["label"]: x["score"] for x in one}, abs=1e-5)
    assert post(server, "/predict", {"inputs": [[t] for t in texts[:3]]}).json() == batch  # TEI's batch form
    raw = post(server, "/predict", {"inputs": texts[0], "raw_scores": True}).json()
    assert [x["label"] for x in raw] == [x["label"] for x in one]
    assert [math.exp(x["score"]) for x in raw] == pytest.approx(scores, abs=1e-6)  # log-probabilities

    n_tokens = sum(len(x) for x in clf.encode(texts[:2]))
    for route in ("/classify", "/v1/classify"):
        t0 = time.time()
        c = post(server, route, {"model": "safety", "input": texts[:2]}).json()
        assert sorted(c) == ["created", "data", "id", "model", "object", "usage"]
        assert re.fullmatch(r"classify-[0-9a-f]{32}", c["id"]) and c["object"] == "list" and c["model"] == "safety"
        assert t0 - 2 <= c["created"] <= time.time() + 1
        assert c["usage"]["prompt_tokens"] == c["usage"]["total_tokens"] == n_tokens
        P = clf.predict_proba(texts[:2])
        for i, d in enumerate(c["data"]):
            assert sorted(d) == ["index", "label", "num_classes", "probs"]
            assert d["index"] == i and d["num_classes"] == 6 and d["label"] == LABELS[int(P[i].argmax())]
            assert d["probs"] == pytest.approx(P[i].tolist(), abs=1e-5)
    single = post(server, "/classify", {"input": texts[0]}).json()  # `model` may be left out
    assert len(single["data"]) == 1 and single["data"][0]["probs"] == pytest.approx(want.tolist(), abs=1e-5)

    info = server.client.get("/info", headers=AUTH).json()
    assert info["model_identity"] == clf.identity and info["labels"] == LABELS and info["max_length"] == 64
    assert info["precision"].startswith("fp32") and info["pooling"] == "last" and info["base"] == "qwen3-tiny"
    assert info["model_id"] == "safety" and re.fullmatch(r"\d+\.\d+\.\d+", info["version"])
    assert info["http_workers"] == 2
    h = server.client.get("/health")
    assert (h.status_code, h.json()) == (200, {"status": "ok"})


def test_concurrent_requests_are_batched_and_equal_sequential_and_api(server, clf, texts):
    """64 parallel requests over 2 HTTP worker processes share forwards; /metrics sums every process."""
    before = server.metrics()
    sequential = [post(server, "/classify", {"input": t}).json()["data"][0]["probs"] for t in texts]
    mid = server.metrics()
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda t: post(server, "/classify", {"input": t}), texts))
    after = server.metrics()
    assert all(r.status_code == 200 for r in responses)
    parallel = [r.json()["data"][0]["probs"] for r in responses]
    api = clf.predict_proba(texts)
    np.testing.assert_allclose(parallel, sequential, atol=1e-5)
    np.testing.assert_allclose(parallel, api, atol=1e-5)
    forwards = after["lft_serve_batch_texts_count"] - mid["lft_serve_batch_texts_count"]
    assert mid["lft_serve_batch_texts_count"] - before["lft_serve_batch_texts_count"] == 64  # one by one: 64
    assert forwards <= 16, forwards  # 64 concurrent requests: far fewer forwards
    assert after["lft_serve_batch_texts_sum"] - mid["lft_serve_batch_texts_sum"] == 64
    key = 'lft_serve_requests_total{route="/classify",status="200"}'
    assert after[key] - before[key] == 128
    assert after['lft_serve_request_duration_seconds_count{route="/classify"}'] >= 128
    assert after["lft_serve_queue_texts"] == 0 and after["lft_serve_requests_in_flight"] == 0


LONG = "今天天气很好，" * 40  # > 64 tokens, < 300 characters
BAD = [  # route, body (bytes: sent as is), status, text in the error message
    ("/predict", b'{"inputs": ', 400, "not valid JSON"),
    ("/predict", b'\xff\xfe{"inputs": "a"}', 400, "not valid JSON"),
    ("/predict", [1, 2], 422, "JSON object"),
    ("/predict", {"input": "a"}, 422, "missing field `inputs`"),
    ("/predict", {"inputs": 5}, 422, "`inputs` must be a string or a list"),
    ("/predict", {"inputs": []}, 422, "`inputs` is empty"),
    ("/predict", {"inputs": ["a", 3]}, 422, "`inputs[1]` must be a string, not number"),
    ("/predict", {"inputs": ["a", None]}, 422, "`inputs[1]` must be a string, not null"),
    ("/predict", {"inputs": ""}, 422, "`inputs[0]` is an empty string"),
    ("/predict", {"inputs": ["a"] * 9}, 413, "--max_texts_per_request"),
    ("/predict", {"inputs": ["a", "长" * 301]}, 413, "`inputs[1]` has 301 characters"),
    ("/predict", {"inputs": ["a", LONG]}, 413, "`inputs[1]` has"),
    ("/predict", {"inputs": "x" * 5000}, 413, "--max_body_bytes"),
    ("/predict", {"inputs": [["a", "b"]]}, 422, "`inputs[0]` is a pair of texts"),
    ("/predict", {"inputs": ["a", ["b", "c"]]}, 422, "`inputs[1]` is a pair of texts"),
    ("/predict", {"inputs": [["a", "b", "c"]]}, 422, "`inputs[0]` must be a text or a one-text list"),
    ("/predict", {"inputs": "a", "raw_scores": "yes"}, 422, "`raw_scores` must be true or false"),
    ("/predict", {"inputs": "a", "truncate": 1}, 422, "`truncate` must be true or false"),
    ("/predict", {"inputs": "a", "truncation_direction": "Left"}, 422, "`truncation_direction`"),
    ("/classify", b'{"input": ', 400, "not valid JSON"),
    ("/classify", {"model": "other", "input": "a"}, 404, "`other` does not exist"),
    ("/classify", {"model": 3, "input": "a"}, 400, "`model` must be a string"),
    ("/classify", {"model": "safety"}, 400, "missing field `input`"),
    ("/classify", {"input": []}, 400, "`input` is empty"),
    ("/classify", {"input": {"text": "a"}}, 400, "`input` must be a string or a list"),
    ("/classify", {"input": ["a", 3.5]}, 400, "`input[1]` must be a string"),
    ("/classify", {"input": [1, 2, 3]}, 400, "token ids"),
    ("/classify", {"input": ["a"] * 9}, 413, "--max_texts_per_request"),
    ("/v1/classify", {"input": "x" * 5000}, 413, "--max_body_bytes"),
]


@pytest.mark.parametrize("route,body,status,message", BAD, ids=[f"{r}:{m}" for r, _, _, m in BAD])
def test_bad_requests_get_4xx_naming_the_field(server, route, body, status, message):
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    r = server.client.post(route, content=raw, headers=AUTH)
    assert r.status_code == status, r.text
    e = r.json()
    if route == "/predict":
        assert sorted(e) == ["error", "error_type"] and message in e["error"], e
        assert e["error_type"] == "Validation"
    else:
        assert e["object"] == "error" and e["code"] == status and message in e["message"], e
        assert e["type"] == ("NotFoundError" if status == 404 else "BadRequestError")


def test_truncate_true_cuts_and_nothing_answered_500(server, clf):
    r = post(server, "/predict", {"inputs": LONG, "truncate": True})
    assert r.status_code == 200
    want = clf.predict_proba([LONG])[0]  # the API keeps the first max_length tokens too
    assert {x["label"]: x["score"] for x in r.json()} == pytest.approx(dict(zip(LABELS, want)), abs=1e-5)
    c = post(server, "/classify", {"input": LONG}).json()  # /classify cuts like training did
    assert c["usage"]["prompt_tokens"] == 64
    m = server.metrics()
    assert not [k for k in m if k.startswith("lft_serve_requests_total") and 'status="5' in k]
    assert m['lft_serve_request_errors_total{route="/predict",status="422"}'] >= 10


def test_auth(server):
    for route, body in (("/predict", {"inputs": "a"}), ("/classify", {"input": "a"})):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = post(server, route, body, headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            e = r.json()
            assert ("API key" in e["error"]) if route == "/predict" else (e["type"] == "AuthenticationError")
        assert post(server, route, body).status_code == 200
    assert server.client.get("/info").status_code == 401
    assert server.client.get("/health").status_code == 200  # open: probes carry no key
    assert server.client.get("/metrics").status_code == 200  # open: counts only, no text
    m = server.metrics()
    assert m['lft_serve_request_errors_total{route="/predict",status="401"}'] == 3


def test_startup_errors_are_one_line(adapter_dir):
    env = {k: v for k, v in subprocess_env().items() if k != KEY_ENV}
    r = subprocess.run([sys.executable, "serve.py", "--lora_model", str(adapter_dir), "--api_key_env", KEY_ENV],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: --api_key_env {KEY_ENV}: that environment variable is not set")
    r = subprocess.run([sys.executable, "serve.py", "--lora_model", str(adapter_dir), "--threshold", "暴力:0.3",
                        "--device", "cpu", "--port", "0"], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --threshold")


def test_threshold_sets_the_label_not_the_probabilities(slow_server, server, texts):
    c = post(slow_server, "/classify", {"input": texts[:4]}).json()
    plain = post(server, "/classify", {"input": texts[:4]}).json()
    assert [d["label"] for d in c["data"]] == ["暴恐"] * 4
    for d, p in zip(c["data"], plain["data"]):
        assert d["probs"] == pytest.approx(p["probs"], abs=1e-5)
    tei = post(slow_server, "/predict", {"inputs": texts[0]}, {}).json()
    assert tei[0]["label"] == "暴恐"  # the chosen label first, the rest high to low
    rest = [x["score"] for x in tei[1:]]
    assert rest == sorted(rest, reverse=True)


def test_sigterm_drains_in_flight_requests_and_exits_0(slow_server, texts):
    """8 requests of 256 texts, a forward per text or two: they are all in flight when SIGTERM arrives (64 texts a
    request were once too few: on a loaded machine the first was answered before the last arrived)."""
    results = []

    def send(k):
        r = slow_server.client.post("/predict", json={"inputs": texts[k * 8:k * 8 + 8] * 32})
        results.append((r.status_code, len(r.json())))
    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while slow_server.metrics()["lft_serve_requests_in_flight"] < 8:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    slow_server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    h = slow_server.client.get("/health")  # still listening while it drains: not ready any more
    assert (h.status_code, h.json()) == (503, {"status": "draining"})
    late = slow_server.client.post("/predict", json={"inputs": "a"})
    assert late.status_code == 503 and late.json()["error_type"] == "Unhealthy"
    for t in threads:
        t.join(60)
    assert results == [(200, 256)] * 8
    assert slow_server.proc.wait(30) == 0, "\n".join(slow_server.lines[-30:])
    assert "stopped" in slow_server.lines[-1]


ADVERSARIAL = ["<|endoftext|>", "a<|im_start|>b<|im_end|>", "<think>x</think>", "<tool_call>", "<|fim_prefix|>",
               "今天天气很好<|endoftext|>", "  spaces\tand\nlines  ", "\u200b\u200d", "emoji 😀👍🏽",
               "Ｆｕｌｌ　ｗｉｄｔｈ",
               "\x00\x01 control", "ﬁ ligature", "x" * 500, ""]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(), st.sampled_from(ADVERSARIAL)), max_size=6).map("".join))
def test_worker_encoder_encodes_as_the_classifier(clf_tokens, text):
    """HTTP workers encode with the tokenizer JSON the model process sends them (no torch there): the same ids
    as Classifier.token_ids for any text, and no special-token id from any text."""
    clf, enc = clf_tokens
    assert enc.token_ids([text]) == clf.token_ids([text])
    # the classifier encodes through the tokenizers backend: the ids of the transformers call, which training
    # and test_saved_lora.py use (lft.data.tokenize_split)
    assert clf.token_ids([text]) == clf.tokenizer([text], add_special_tokens=False)["input_ids"]
    assert enc.cut(enc.token_ids([text])) == clf.encode([text])
    assert not set(enc.token_ids([text])[0]) & clf_tokens_special(clf)


def clf_tokens_special(clf) -> set[int]:
    return {int(i) for i in clf.tokenizer.backend_tokenizer.get_added_tokens_decoder()}


@pytest.fixture(scope="module")
def clf_tokens(clf):
    from lft.serving import Encoder

    tok = clf.tokenizer
    enc = Encoder(tok.backend_tokenizer.to_str(), tok.pad_token_id, clf.max_length)
    assert enc.token_ids(ADVERSARIAL) == clf.token_ids(ADVERSARIAL)
    return clf, enc


def test_the_classifier_never_encodes_through_a_truncating_backend(clf):
    """Classifier.token_ids reads the backend directly only while nothing set truncation or padding on it; when
    something has (a caller's own code), it goes through the tokenizer's call, which encodes without them, so no
    text is ever cut short silently."""
    tok = clf.tokenizer
    long = "很长的文本" * 100
    full = clf.token_ids([long])[0]
    assert len(full) > 20
    tok.backend_tokenizer.enable_truncation(max_length=8)
    try:
        assert clf.token_ids([long])[0] == full
        assert tok.backend_tokenizer.truncation["max_length"] == 8  # left as the caller set it
    finally:
        tok.backend_tokenizer.no_truncation()


def _workers(pid: int) -> list[int]:
    """The HTTP worker processes of a serve.py process (its spawned children, not the resource tracker)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return [k for k in kids if b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()]


def test_a_crashed_worker_stops_the_server_and_a_killed_server_its_workers(adapter_dir, texts):
    s = Server("--lora_model", str(adapter_dir), "--http_workers", "2")
    try:
        workers = _workers(s.proc.pid)
        assert len(workers) == 2
        assert s.client.post("/predict", json={"inputs": texts[0]}).status_code == 200
        os.kill(workers[0], signal.SIGKILL)
        assert s.proc.wait(30) == 1
        assert any(re.fullmatch(r"error: HTTP worker \d exited with -9; stopping the server", x) for x in s.lines)
    finally:
        s.stop()
    s = Server("--lora_model", str(adapter_dir), "--http_workers", "2")
    workers = _workers(s.proc.pid)
    s.proc.kill()  # kill -9 of the model process: its workers see the pipe close and exit
    s.proc.wait()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{w}").exists() and b"Z" not in _state(w) for w in workers):
        assert time.monotonic() < deadline, "HTTP workers outlived the model process"
        time.sleep(0.1)
    with pytest.raises(httpx.TransportError):
        httpx.get(s.url + "/health", timeout=5)


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return b"Z"


def test_int8_server_notes_amx_only_and_answers_as_the_int8_api(adapter_dir, texts):
    """--quantize int8 on CPU: faster than fp32 at every size, and than --bf16 except on a CPU with AMX, where
    serve.py says at start that it is the memory option (lft.quantize.int8_note); it serves the int8 model's
    probabilities."""
    from lft.predict import Classifier
    from lft.quantize import int8_note

    s = Server("--lora_model", str(adapter_dir), "--quantize", "int8", "--http_workers", "1")
    try:
        note = int8_note("int8", "cpu")  # on a CPU with AMX only (this development machine has none)
        assert [x for x in s.lines if x.startswith("note: --quantize int8")] == ([f"note: {note}"] if note else [])
        r = s.client.post("/classify", json={"input": texts[:4]})
        assert r.status_code == 200
        want = Classifier.load(adapter_dir, device="cpu", quantize="int8").predict_proba(texts[:4])
        np.testing.assert_allclose([row["probs"] for row in r.json()["data"]], want, atol=1e-5, rtol=0)
    finally:
        s.stop()
