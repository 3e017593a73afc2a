"""Inference: the one path from token ids to class probabilities, and the Python API that labels new texts.

Training's evaluation, test_saved_lora.py, predict.py and serve.py (lft/serving.py) all go through
`Predictor`:

    pred = Predictor(model, runtime, pad_id, max_length)
    idx, P = pred.probs(input_ids, batches)  # the texts' indices as they ran, their probabilities (CPU, float32)
    P_all = in_order([(idx, P)], len(input_ids))   # numpy (n, num_labels), row i for text i (parts: ranks')

Batches are lists of indices (lft.data.eval_batches). With packing, each batch is one row of texts back to back;
with CUDA graphs the row is laid out in a fixed shape (lft.data.collate_packed_static) and replayed; a shape's
graph is captured the second time it is used (lft/cuda_graphs.py) and kept with the Predictor.

The API for users:

    from lft.predict import Classifier
    clf = Classifier.load("lora_model/best_model")                 # base: the path the adapter recorded
    clf = Classifier.load("best_model", checkpoint="/models/Qwen3-1.7B", device="cuda", precision="bf16")
    clf.predict(["text one", "text two"])   # [Prediction(label='正常', label_id=0, score=0.97, probs={...}), ...]
    clf.predict_proba(texts)                # numpy (n, num_labels)
    clf.labels                              # ['正常', '歧视', ...]

Thresholds (`parse_thresholds("暴恐:0.3,色情低俗:0.5")`): a text whose probability for a listed label reaches
its threshold gets that label (the highest probability among such labels), else the argmax.
"""
from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from .common import UserError, release_freed_memory
from .labels import choose_labels, parse_thresholds  # noqa: F401  (the API's thresholds; torch-free there)
from .quantize import check_quantize, forward_tokens, load_dtype, on_cpu_int8, quantize_model
from .runtime import Runtime, autocast


COMPILE_ROW_TOKENS = 3000  # Classifier.load's compiling row: a large row (> D.SMALL_ROW_TOKENS), of few tokens


class Predictor:
    """Probabilities of a model's texts, by the runtime's path (eager padded, eager packed, or CUDA graphs)."""

    def __init__(self, model, runtime: Runtime, pad_id: int, max_length: int, quantize: str = "none"):
        self.model, self.rt, self.pad_id, self.max_length = model, runtime, pad_id, max_length
        self.quantize = quantize  # the lft.quantize mode the model was quantised with (forward_tokens)
        self._graphs = None  # lft.cuda_graphs.RowGraphs, made on first use
        self.row_tokens: int | None = None  # the last batches()' row budget: the width of every full row
        # int8 on the CPU gives the freed memory of each forward back to the system (glibc keeps it otherwise: on
        # the 1.7B shape, 0.44 GiB more resident after three sizes of forward, and a peak of 0.64x bf16's)
        self._release = on_cpu_int8(quantize, runtime.device)

    def batches(self, lengths: np.ndarray, rank: int = 0, world: int = 1, max_tokens: int | None = None):
        """Evaluation batches of this rank: each text once over all ranks, rows bounded by `max_tokens` (int8 on
        the CPU: by lft.quantize.forward_tokens)."""
        self.row_tokens = forward_tokens(self.quantize, self.rt.device, max_tokens or 32 * self.max_length,
                                         self.max_length)
        return D.eval_batches(lengths, rank, world, max_tokens=self.row_tokens, packed=self.rt.eval_graphs)

    @torch.inference_mode()
    def probs(self, input_ids: list[list[int]], batches: list[list[int]]) -> tuple[np.ndarray, torch.Tensor]:
        """(indices, probabilities) of the texts in `batches`: their indices in the order they ran (int64), and
        a float32 (len(indices), num_labels) tensor on the CPU, row k for text indices[k] (no per-text objects:
        a dict of 18,000 rows cost ~0.1 s per evaluation)."""
        was_training = self.model.training
        if was_training:  # walking ~1,500 modules twice costs ~ms: only when training's evaluation needs it
            self.model.eval()
        chunks = []
        for batch in batches:
            seqs = [input_ids[i] for i in batch]
            chunks.append(self._row(seqs))
            if self._release:
                release_freed_memory()
        if was_training:
            self.model.train()
        order = np.fromiter(itertools.chain.from_iterable(batches), dtype=np.int64)
        out = torch.cat(chunks).float().cpu() if chunks else torch.empty(0, 0)  # one transfer at the end
        return order, out

    def _row(self, seqs: list[list[int]]) -> torch.Tensor:
        if self.rt.eval_graphs:
            width, slots = D.eval_shape(len(seqs), sum(map(len, seqs)), self.max_length, self.row_tokens)
            enc = D.collate_packed_static(seqs, width, slots, self.max_length, self.pad_id)
            return self._graph_runner()(enc)[:len(seqs)].clone()  # the graph's output is overwritten next replay
        enc = D.collate_packed(seqs) if self.rt.packing else D.collate_padded(seqs, self.pad_id)
        enc = D.to_device(enc, self.rt.device)
        with autocast(self.rt.device, self.rt.amp_dtype):
            return F.softmax(self.model(**enc), dim=-1)

    @property
    def capture_seconds(self) -> float:
        """Host time spent capturing CUDA graphs so far (0 without graphs): predict.py's "time:" line."""
        return self._graphs.capture_seconds if self._graphs is not None else 0.0

    def _graph_runner(self):
        if self._graphs is None:
            from .cuda_graphs import RowGraphs

            def forward(s):
                with autocast(self.rt.device, self.rt.amp_dtype):
                    return F.softmax(self.model(s["input_ids"], position_ids=s["position_ids"],
                                                cu_seqlens=s["cu_seqlens"], max_len=s["max_len"]), dim=-1)
            self._graphs = RowGraphs(forward, self.rt.device)
        return self._graphs


def in_order(parts: list[tuple[np.ndarray, torch.Tensor]], n: int) -> np.ndarray:
    """Probabilities of texts 0..n-1, (n, num_labels) float32, from Predictor.probs' (indices, probabilities)
    parts (one per rank, each text in exactly one)."""
    parts = [(i, P) for i, P in parts if len(i)]
    if sum(len(i) for i, _ in parts) != n:
        raise ValueError(f"{sum(len(i) for i, _ in parts)} probabilities for {n} texts")
    out = np.empty((n, parts[0][1].shape[1] if parts else 0), dtype=np.float32)
    for i, P in parts:
        out[i] = P.numpy()
    return out


# --- the Python API ----------------------------------------------------------------------------------------

@dataclass
class Prediction:
    label: str
    label_id: int
    score: float  # the probability of `label`
    probs: dict[str, float] = field(repr=False)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def runtime_args(device: str = "auto", precision: str = "auto", packing: str = "auto", compile: str = "auto",
                 cuda_graphs: str = "auto", attn_implementation: str = "auto") -> argparse.Namespace:
    """The runtime flags (lft.runtime.add_runtime_args) as the API's keyword arguments give them."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return argparse.Namespace(device=device, fp16=precision == "fp16", bf16=precision == "bf16",
                              fp32=precision == "fp32", packing=packing, compile=compile, cuda_graphs=cuda_graphs,
                              attn_implementation=attn_implementation)


def pick_device(flag: str) -> torch.device:
    if flag == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device visible")
    return torch.device("cuda", torch.cuda.current_device()) if flag != "cpu" and torch.cuda.is_available() \
        else torch.device("cpu")


class Classifier:
    """A trained classifier, ready to label texts (see the module docstring)."""
    note: str | None = None  # why compile / CUDA graphs are off for this job (Classifier.load's job_tokens)
    compile_seconds = 0.0  # of the load: compiling the decoder layers on one row (0 without compile)

    def __init__(self, model, tokenizer, meta: dict, runtime: Runtime, max_length: int | None = None,
                 max_tokens: int | None = None, quantize: str = "none"):
        self.model, self.tokenizer, self.meta, self.runtime = model, tokenizer, meta, runtime
        self.labels: list[str] = list(meta["labels"])
        self.max_length = max_length or meta["max_length"]
        self.quantize = quantize  # the lft.quantize mode the model was loaded with
        # tokens per packed row (or padded batch)
        self.max_tokens = forward_tokens(quantize, runtime.device, max_tokens or 64 * self.max_length, self.max_length)
        self.predictor = Predictor(model, runtime, tokenizer.pad_token_id, self.max_length, quantize)
        self.identity = meta.get("fingerprint", "")

    @classmethod
    def load(cls, model, checkpoint=None, device: str = "auto", precision: str = "auto", *, args=None,
             max_length: int | None = None, max_tokens: int | None = None, quantize: str = "none",
             job_tokens: int | None = None) -> "Classifier":
        """`model`: an adapter folder (its base: `checkpoint`, else the path the adapter recorded, checked by
        identity) or a merged folder. `args`: a parsed namespace of the runtime flags (scripts), instead of
        device/precision. `quantize`: none|int8|fp8 (lft.quantize: the base projections, LoRA and head stay float).
        `job_tokens`: the real tokens the caller will classify, when known: a job too small for compiling and CUDA
        graphs to pay for themselves runs without them (lft.runtime.for_job, where their flags are 'auto'; the
        line saying so is `clf.note`). Unknown (None): a long-lived classifier, which they pay for.
        With compile on, loading ends by compiling the decoder layers on one row of placeholder tokens, as a
        server warms up at boot: the seconds go to the load (`clf.compile_seconds`), not to the first texts
        (on an H200 the Qwen3-1.7B shape compiled in ~11 s cold, ~2 s from inductor's disk cache: run 13, before
        the float attributes became constants)."""
        from . import adapter
        from . import runtime as R
        import qwen3_classification_direct as qcd

        args = args or runtime_args(device, precision)
        dev = pick_device(args.device)
        problems = []
        check_quantize(quantize, dev, problems)  # before the minutes a large model takes to load
        if problems:
            raise UserError("; ".join(problems))
        rt = R.resolve(args, dev, world=1, training=False)
        note = None
        if job_tokens is not None:
            rt, note = R.for_job(rt, args, job_tokens, "evaluation")
        net, tok, meta = adapter.load_classifier(checkpoint, model, load_dtype(quantize, rt), rt.attn, dev)
        meta = {**meta, "fingerprint": adapter.fingerprint(model)}
        quantize_model(net, quantize, rt)  # on the device (fp8 needs it), before compiling fuses around it
        if rt.compile:
            qcd.compile_decoder_layers(net)
        clf = cls(net, tok, meta, rt, max_length, max_tokens, quantize)
        clf.note = note
        if rt.compile:
            clf.compile_seconds = clf._compile()
        return clf

    def _compile(self) -> float:
        """Compile the decoder layers now, on a row of COMPILE_ROW_TOKENS placeholder tokens (a width no model
        dimension shares: dynamo would otherwise tie the two and compile again for other widths); seconds."""
        import time

        t = time.perf_counter()
        n = -(-COMPILE_ROW_TOKENS // self.max_length)  # texts of at most max_length tokens
        self.proba_of_ids([[self.tokenizer.pad_token_id] * (COMPILE_ROW_TOKENS // n)] * n)
        return time.perf_counter() - t

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids, at most max_length per text (its first tokens). Special tokens in a text are text."""
        return self.cut(self.token_ids(texts))

    def cut(self, ids: list[list[int]]) -> list[list[int]]:
        """Each text's first max_length token ids (a text that tokenises to nothing reads as one pad token)."""
        return [x[:self.max_length] or [self.tokenizer.pad_token_id] for x in ids]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Every token id of each text, none cut (serve.py refuses a text over max_length unless asked to cut).
        Safe to call from several threads. Through the `tokenizers` backend (lft.data.encode_texts): less than
        half transformers' call's time, most of it outside the GIL, which predict.py's model thread needs to
        launch rows (153.6k -> 161.4k tokens/s on an H200, bench/RESULTS.md runs 14-15)."""
        return D.encode_texts(self.tokenizer, texts)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(n, num_labels) float32 probabilities, in the order given."""
        if isinstance(texts, str):
            texts = [texts]
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise UserError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        return self.proba_of_ids(self.encode(texts))

    def proba_of_ids(self, input_ids: list[list[int]]) -> np.ndarray:
        if not input_ids:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
        return in_order([self.predictor.probs(input_ids, self.predictor.batches(lengths, max_tokens=self.max_tokens))],
                        len(input_ids))

    def predict(self, texts: list[str], thresholds: dict[int, float] | str | None = None) -> list[Prediction]:
        if isinstance(thresholds, str):
            thresholds = parse_thresholds(thresholds, self.labels)
        P = self.predict_proba(texts)
        return self.to_predictions(P, choose_labels(P, thresholds))

    def to_predictions(self, P: np.ndarray, ids: np.ndarray) -> list[Prediction]:
        return [Prediction(self.labels[k], int(k), float(p[k]), {n: float(v) for n, v in zip(self.labels, p)})
                for p, k in zip(P, ids)]

