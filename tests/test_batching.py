"""Batching: length grouping, optimizer-step plans, packed rows, evaluation shards."""
from pathlib import Path

import numpy as np
import torch

from lft import data as D


def test_length_grouped_batches_cover_everything_once_and_are_reproducible():
    lengths = np.random.default_rng(0).integers(5, 200, 1003)
    a = D.length_grouped_batches(lengths, 16, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(1003))
    assert a == D.length_grouped_batches(lengths, 16, seed=3, epoch=1)
    assert a != D.length_grouped_batches(lengths, 16, seed=3, epoch=2)
    assert max(lengths[a[0]]) == lengths.max()  # the longest batch first: OOM shows in step 1
    # grouping: far less padding than a plain shuffle
    pad = lambda bs: sum(len(b) * max(lengths[b]) - lengths[b].sum() for b in bs)  # noqa: E731
    assert pad(a) < 0.3 * pad(D.length_grouped_batches(lengths, 16, 3, 1, group_by_length=False))


def test_training_steps_split_evenly_over_ranks():
    batches = [[i] for i in range(11)]
    steps = D.training_steps(batches, accum=2, world=2)
    assert [len(s) for s in steps] == [4, 4, 2]  # the short last step is cut to a multiple of world
    assert D.training_steps(batches, accum=2, world=1)[-1] == [[10]]


def test_merge_for_packing_respects_budget_and_keeps_order():
    lengths = np.array([100, 100, 100, 100, 300])
    micro = [[0, 1], [2, 3], [4]]
    assert D.merge_for_packing(micro, lengths, 400) == [[0, 1, 2, 3], [4]]
    assert D.merge_for_packing(micro, lengths, 10_000) == [[0, 1, 2, 3, 4]]
    assert D.merge_for_packing(micro, lengths, 50) == [[0, 1], [2, 3], [4]]  # never splits a micro-batch


def test_eval_batches_each_text_once_over_ranks():
    lengths = np.random.default_rng(1).integers(1, 300, 997)
    seen = []
    for rank in range(3):
        for b in D.eval_batches(lengths, rank, 3, max_tokens=2048):
            assert len(b) * max(lengths[b]) <= max(2048, max(lengths[b]))
            seen += b
    assert sorted(seen) == list(range(997))
    seen = []
    for rank in range(2):  # packed rows: the budget counts real tokens, so rows of short texts hold many
        batches = D.eval_batches(lengths, rank, 2, max_tokens=2048, packed=True)
        assert all(lengths[b].sum() <= 2048 for b in batches) and max(len(b) for b in batches) > 2048 // 299
        assert all(lengths[b].sum() > 2048 - 300 for b in batches[:-1])  # each row full but for one text
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(997))


def test_collate_packed_layout():
    out = D.collate_packed([[5, 6, 7], [8], [9, 10]])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert out["cu_seqlens"].tolist() == [0, 3, 4, 6] and out["cu_seqlens"].dtype == torch.int32
    assert out["max_len"] == 3
    padded = D.collate_padded([[5, 6, 7], [8]], pad_id=0, padding_side="left")
    assert padded["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    moved = D.to_device(out, "cpu")
    assert moved["max_len"] == 3 and torch.equal(moved["input_ids"], out["input_ids"])


def test_collate_packed_static_layout():
    out = D.collate_packed_static([[5, 6, 7], [8]], width=9, slots=6, max_len=3, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 0, 0, 0, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 0, 1]]  # padding: segments of <= max_len
    assert out["cu_seqlens"].tolist() == [0, 3, 4, 7, 9, 9, 9] and out["cu_seqlens"].dtype == torch.int32
    assert out["max_len"] == 3
    assert D.static_shape(36, 2990, 256) == (3072, 64)
    assert D.static_shape(100, 3072, 256) == (3072, 128)  # no padding needed: 100 slots -> 128
    assert D.static_shape(1, 5, 256) == (128, 64)
    assert D.static_shape(1, 5, 256, step=512) == (512, 64)
    for n_texts, n_tokens in [(1, 1), (36, 4608), (63, 300), (500, 9000)]:  # every row fits its shape
        width, slots = D.static_shape(n_texts, n_tokens, 256)
        assert width >= n_tokens and slots >= n_texts + -(-(width - n_tokens) // 256)
    import pytest

    with pytest.raises(ValueError):
        D.collate_packed_static([[1] * 10], width=8, slots=4, max_len=16, pad_id=0)


def test_eval_shape_few_shapes_and_every_row_fits():
    """Large evaluation rows come in few shapes (each new one costs an eager run and a capture): every full row
    of a budget has one width and, for texts of 16+ tokens on average, one slot count; shorter rows take widths
    in quarter octaves, 2048, 2560, ..., 4096, 5120, ... (at most a fifth padding); every row fits its shape."""
    import random

    rng = random.Random(0)
    lengths = np.array([min(256, max(8, int(rng.lognormvariate(4.25, 0.6)))) for _ in range(20000)])
    shapes, waste = set(), []
    for batch in D.eval_batches(lengths, max_tokens=16384, packed=True):
        n = int(lengths[batch].sum())
        width, slots = D.eval_shape(len(batch), n, 256, cap=16384)
        assert width >= n and slots >= len(batch) + -(-(width - n) // 256)
        shapes.add((width, slots))
        waste.append((width - n) / width)
    assert len(shapes) <= 3, shapes  # the full rows' shape + the last row's (+ a row of the shortest texts)
    assert sorted(waste)[-2] < 0.02  # padding only in the last row
    assert D.eval_shape(200, 16000, 256, cap=16384) == D.eval_shape(64, 16384, 256, cap=16384) == (16384, 1024)
    assert [D.eval_shape(10, n, 256)[0] for n in (2049, 3073, 4097, 6145, 8193)] == [2560, 3584, 5120, 7168, 10240]
    assert D.eval_shape(34, 2600, 256, cap=16384) == (3072, 64)  # a row short of the budget: slots for its texts
    assert D.eval_shape(3, 700, 256, cap=16384) == D.static_shape(3, 700, 256) == (768, 64)  # small: steps of 128
    assert D.eval_shape(10, 9000, 256, cap=10000)[0] == 10240  # the budget rounded up to 512: no wider
    for n_texts, n_tokens in [(1, 2049), (5000, 16384), (3, 700), (64, 40000)]:  # rows over the budget fit too
        width, slots = D.eval_shape(n_texts, n_tokens, 256, cap=16384)
        assert width >= n_tokens and slots >= n_texts + -(-(width - n_tokens) // 256)


def test_threaded_chunked_encoding_equals_transformers_call(tiny_ckpt):
    """lft.data.encode_texts in several threads over small chunks gives, in order, exactly the ids of
    transformers' own call, special-token strings and odd characters included; a truncating backend is
    undone, never obeyed; tokenize_split cuts only at max_length and counts what it cut."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    texts = [f"第{i}条 <|endoftext|> 你好 \u200b" * (1 + i % 7) + "\x00<|im_start|>" * (i % 3) for i in range(53)]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    seen = []
    assert D.encode_texts(tok, texts, threads=4, chunk=5, progress=seen.append) == want
    assert sum(seen) == len(texts) and len(seen) == 11
    assert D.encode_texts(tok, texts) == want
    tok.backend_tokenizer.enable_truncation(max_length=4)
    try:
        assert D.encode_texts(tok, texts, threads=3, chunk=7) == want
    finally:
        tok.backend_tokenizer.no_truncation()
    split = D.Split(path=Path("x.csv"), texts=texts, labels=np.zeros(len(texts), dtype=np.int64))
    D.tokenize_split(split, tok, max_length=30, show=False, threads=3)
    assert split.input_ids == [x[:30] for x in want]
    assert split.n_truncated == sum(len(x) > 30 for x in want) > 0
