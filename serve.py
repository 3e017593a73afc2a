"""Serve a trained classifier over HTTP, with token-budget dynamic batching.

    python serve.py --lora_model ./lora_model/best_model --checkpoint /path/to/Qwen3-1.7B --port 8000
    python serve.py --lora_model ./lora_model/best_model_merged            # a merged folder needs no base
    python serve.py --lora_model demo_run/best_model --device cpu           # the demo's adapter, on CPU

    curl -s localhost:8000/predict  -d '{"inputs": "今天天气很好"}'                      # TEI format
    curl -s localhost:8000/classify -d '{"model": "...", "input": ["文本一", "文本二"]}'  # vLLM format

Routes: POST /predict (text-embeddings-inference), POST /classify and /v1/classify (vLLM), GET /health,
/info, /metrics (Prometheus). --http_workers processes take the HTTP requests, check and tokenise them
(lft/serving.py); this process holds the model once and batches their texts (lft/engine.py): a lone request
on an idle server runs at once; texts that queue while a forward runs wait at most --max_wait_ms for the
queue to fill --max_batch_tokens, then run as one batch. SIGTERM: /health answers 503, requests in flight
finish, exit 0. The startup prints `ready in X s (load A s, warm-up B s) on http://...`.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from lft import runtime as R  # noqa: E402  (torch, transformers, fastapi and uvicorn load after parsing)
from lft.common import ArgumentParser, HelpFormatter, UserError, exit_script, redact  # noqa: E402
from lft.quantize import add_quantize_arg, check_quantize, int8_note  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # model
    p.add_argument("--lora_model", required=True, help="adapter folder (best_model/) or merged folder")
    p.add_argument("--checkpoint", default=None, help="base Qwen3 folder (default: the base the adapter recorded; "
                   "not needed for a merged model)")
    p.add_argument("--max_length", type=int, default=None, help="tokens read per text (default: the adapter's)")
    p.add_argument("--threshold", default=None, help="e.g. 暴恐:0.3,色情低俗:0.5: a text reaching a listed "
                   "label's probability gets that label (the `label` fields); probabilities stay the model's")
    p.add_argument("--served_model_name", default=None,
                   help="the name /classify answers to and reports (default: --lora_model as given)")
    # server
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed in the ready line)")
    p.add_argument("--api_key_env", default=None, help="name of the environment variable holding the API key; "
                   "then every route but /health and /metrics needs `Authorization: Bearer <key>`")
    p.add_argument("--drain_timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight before exiting anyway")
    # batching
    p.add_argument("--max_batch_tokens", type=int, default=16384, help="real tokens per forward (a packed row on "
                   "GPU); texts from concurrent requests share it (--quantize int8 on the CPU splits a batch into "
                   "forwards of at most 256 tokens, or max_length)")
    p.add_argument("--max_wait_ms", type=float, default=5.0,
                   help="under load, how long the first text queued during a forward waits for others to fill the "
                        "next one (an idle server does not wait)")
    p.add_argument("--http_workers", type=int, default=None, help="HTTP worker processes in front of the model "
                   "process: they parse, check and tokenise requests (default: a quarter of the CPU cores, 1 to 4)")
    p.add_argument("--tokenizer_threads", type=int, default=2, help="threads per HTTP worker that tokenise long "
                   "requests")
    # limits
    p.add_argument("--max_texts_per_request", type=int, default=256)
    p.add_argument("--max_chars_per_text", type=int, default=20000)
    p.add_argument("--max_body_bytes", type=int, default=2 << 20, help="request body limit (default 2 MiB)")
    p.add_argument("--max_concurrent_requests", type=int, default=512,
                   help="classification requests in flight; more get 429")
    R.add_runtime_args(p)
    add_quantize_arg(p)
    args = p.parse_args(argv)
    problems = []
    for flag in ("max_batch_tokens", "max_texts_per_request", "max_chars_per_text", "max_body_bytes",
                 "max_concurrent_requests", "tokenizer_threads", "http_workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag} must be >= 1")
    if args.max_wait_ms < 0 or args.drain_timeout < 0:
        problems.append("--max_wait_ms and --drain_timeout must be >= 0")
    if args.max_length is not None and args.max_length < 2:
        problems.append("--max_length must be >= 2")
    if not 0 <= args.port <= 65535:
        problems.append(f"--port {args.port}: must be 0..65535")
    if not Path(args.lora_model).is_dir():
        problems.append(f"--lora_model {args.lora_model}: not a folder")
    if args.api_key_env is not None and not os.environ.get(args.api_key_env):
        problems.append(f"--api_key_env {args.api_key_env}: that environment variable is not set or empty "
                        f"(export {args.api_key_env}=<key>; the key never goes on the command line)")
    R.check_runtime_args(args, problems)
    check_quantize(args, args.device, problems)
    if problems:
        raise UserError("; ".join(problems))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from lft import adapter, engine, serving
    from lft.labels import parse_thresholds

    meta = adapter.read_classifier_config(args.lora_model)
    labels = meta["labels"]
    thresholds = parse_thresholds(args.threshold, labels)
    max_length = args.max_length or meta["max_length"]
    if args.max_batch_tokens < max_length:
        raise UserError(f"--max_batch_tokens {args.max_batch_tokens} must be >= max_length {max_length} "
                        "(one text must fit a forward)")
    settings = serving.Settings(
        model_name=args.served_model_name or redact(args.lora_model), host=args.host,
        max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
        max_texts_per_request=args.max_texts_per_request, max_chars_per_text=args.max_chars_per_text,
        max_body_bytes=args.max_body_bytes, max_concurrent_requests=args.max_concurrent_requests,
        drain_timeout_s=args.drain_timeout, tokenizer_threads=args.tokenizer_threads,
        http_workers=args.http_workers or min(4, max(1, (os.cpu_count() or 1) // 4)),
        api_key=os.environ[args.api_key_env] if args.api_key_env else None)
    sock = serving.bind(args.host, args.port)
    if note := int8_note(args.quantize, args.device):
        print(f"note: {note}", flush=True)

    def load():
        from lft.predict import Classifier

        return Classifier.load(args.lora_model, args.checkpoint, args=args, max_length=args.max_length,
                               max_tokens=args.max_batch_tokens, quantize=args.quantize)
    return engine.run(settings, labels, thresholds, {"lora_model": redact(args.lora_model)}, T_START, sock, load)


if __name__ == "__main__":
    exit_script(main)
