"""The model module: pooling, packing, equality with transformers' own classifier, save/load round trips."""
import contextlib
import json
import unicodedata

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Qwen3ForSequenceClassification

import qwen3_classification_direct as qcd
from lft import adapter, base
from lft.base import identity as base_identity
from lft.common import UserError
from lft.data import DEFAULT_LABELS, collate_packed, collate_packed_static, collate_padded, static_shape

TEXTS = ["今天天气很好，我们一起去公园散步。", "出售假证件，量大从优", "hello 世界", "某些人就是素质低，千万别和他们来往，看着就烦。"]


@pytest.fixture(scope="module")
def model_and_tok(tiny_ckpt):
    torch.manual_seed(0)
    model, _ = qcd.build_classifier(tiny_ckpt, DEFAULT_LABELS, dropout=0.0,
                                    lora=dict(r=4, alpha=8, dropout=0.0))
    # non-zero LoRA B so the adapter actually changes the output (peft initialises B to zero)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval(), qcd.load_tokenizer(tiny_ckpt)


def encode(tok, texts=TEXTS):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_pad_token_is_endoftext(model_and_tok):
    _, tok = model_and_tok
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643


def test_no_lm_head_and_head_shape(model_and_tok):
    model, _ = model_and_tok
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names)
    assert model.score.weight.shape == (6, 64) and model.score.bias is None


def test_last_token_pooling_left_equals_right_padding(model_and_tok):
    model, tok = model_and_tok
    seqs = encode(tok)
    with torch.no_grad():
        right = model(**collate_padded(seqs, tok.pad_token_id, "right"))
        left = model(**collate_padded(seqs, tok.pad_token_id, "left"))
        single = torch.cat([model(**collate_padded([s], tok.pad_token_id)) for s in seqs])
    assert torch.allclose(right, single, atol=1e-5)
    assert torch.allclose(left, single, atol=1e-5)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_equals_padded(tiny_ckpt, pooling):
    torch.manual_seed(1)
    model, _ = qcd.build_classifier(tiny_ckpt, DEFAULT_LABELS, dropout=0.0, pooling=pooling)
    model.eval()
    tok = qcd.load_tokenizer(tiny_ckpt)
    seqs = encode(tok)
    with torch.no_grad():
        padded = model(**collate_padded(seqs, tok.pad_token_id))
        packed = model(**collate_packed(seqs))
    assert (padded - packed).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_fixed_shape_row_equals_packed_row_logits_loss_and_gradients(tiny_ckpt, pooling):
    """What a CUDA graph replays (a row padded to a fixed width, unused slots, per-text loss weights) gives the
    logits, loss and LoRA gradients of the exact packed row: padding and empty slots leak into nothing."""
    from lft.train_step import micro_loss

    torch.manual_seed(3)
    model, _ = qcd.build_classifier(tiny_ckpt, DEFAULT_LABELS, dropout=0.0, pooling=pooling,
                                    lora=dict(r=4, alpha=8, dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # fresh LoRA B is 0: give the adapters gradients worth comparing
            torch.nn.init.normal_(p, std=0.1)
    tok = qcd.load_tokenizer(tiny_ckpt)
    seqs = encode(tok)
    max_len = max(map(len, seqs))
    width, slots = static_shape(len(seqs), sum(map(len, seqs)), max_len, step=64)
    assert width - sum(map(len, seqs)) > max_len  # two padding segments
    y = torch.tensor([1, 4, 0, 2, 5][:len(seqs)])
    w = torch.rand(len(seqs)) / len(seqs)
    fixed = collate_packed_static(seqs, width, slots, max_len, tok.pad_token_id)
    fixed_y, fixed_w = torch.nn.functional.pad(y, (0, slots - len(seqs))), torch.nn.functional.pad(w, (0, slots - len(seqs)))

    def run(enc, yy, ww):
        model.zero_grad(set_to_none=True)
        loss = micro_loss(model, enc, yy, ww, None, torch.device("cpu"))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            logits = model(**enc)
        return loss.detach(), logits, grads

    model.train()
    loss_a, logits_a, grads_a = run(collate_packed(seqs), y, w)
    loss_b, logits_b, grads_b = run(fixed, fixed_y, fixed_w)
    assert logits_b.shape[0] == slots
    assert (logits_a - logits_b[:len(seqs)]).abs().max().item() <= 1e-5
    assert abs(loss_a.item() - loss_b.item()) <= 1e-6
    assert len(grads_a) > 4 and all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-4) for n in grads_a)
    assert any(grads_a[n].abs().sum() > 0 for n in grads_a if "lora_A" in n)


def test_matches_transformers_sequence_classification(tiny_ckpt):
    torch.manual_seed(2)
    ours, _ = qcd.build_classifier(tiny_ckpt, DEFAULT_LABELS, dropout=0.1)
    ours.eval()
    tok = qcd.load_tokenizer(tiny_ckpt)
    hf = Qwen3ForSequenceClassification.from_pretrained(tiny_ckpt, num_labels=6, pad_token_id=tok.pad_token_id)
    hf.score.weight.data.copy_(ours.score.weight.data)
    hf.eval()
    seqs = encode(tok)
    for side in ("right", "left"):
        enc = collate_padded(seqs, tok.pad_token_id, side)
        with torch.no_grad():
            a = ours(**enc)
            b = hf(**enc).logits
        assert torch.allclose(a, b, atol=1e-5), side


def test_adapter_round_trip_identical_logits(model_and_tok, tiny_ckpt, tmp_path):
    model, tok = model_and_tok
    from lft.base import identity as base_identity
    meta = {"labels": list(DEFAULT_LABELS), "max_length": 64, "args": {}, "metrics": None,
            "base": base_identity(tiny_ckpt, model.backbone)}
    adapter.save_adapter(model, tmp_path / "adapter", meta)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(adapter.ADAPTER_FILES)
    loaded, _, meta2 = adapter.load_classifier(tiny_ckpt, tmp_path / "adapter")
    assert meta2["labels"] == list(DEFAULT_LABELS)
    enc = collate_padded(encode(tok), tok.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model(**enc), loaded(**enc))

    # merged export: same logits through our loader and through plain transformers
    adapter.export_merged(loaded, tok, tmp_path / "merged", meta2, dtype=torch.float32)
    merged, _, _ = adapter.load_classifier(None, tmp_path / "merged")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert hf.config.id2label[3] == "政治安全" and hf.config.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        ref = model(**enc)
        assert torch.allclose(merged(**enc), ref, atol=1e-5)
        assert torch.allclose(hf(**enc).logits, ref, atol=1e-5)


def test_adapter_refuses_other_base(model_and_tok, tiny_ckpt, tmp_path):
    from lft.demo import build_tiny_qwen3
    from lft.base import identity as base_identity

    model, _ = model_and_tok
    meta = {"labels": list(DEFAULT_LABELS), "max_length": 64, "args": {}, "metrics": None,
            "base": base_identity(tiny_ckpt, model.backbone)}
    adapter.save_adapter(model, tmp_path / "adapter", meta)
    other = build_tiny_qwen3(tmp_path / "other", seed=7)
    with pytest.raises(UserError, match="weights differ"):
        adapter.load_classifier(other, tmp_path / "adapter")
    wider = build_tiny_qwen3(tmp_path / "wider", hidden=32)
    with pytest.raises(UserError, match="architecture differs"):
        adapter.load_classifier(wider, tmp_path / "adapter")


def reference_checksums(backbone, chunk):
    """tensor_checksums as first written (a fresh float64 copy per chunk, one sync per tensor): what the
    adapters on disk recorded. The fast version must give the same bits."""
    out = {}
    for full_name, p in backbone.named_parameters():
        if "lora_" in full_name:
            continue
        flat = p.detach().reshape(-1)
        alt, sq = (torch.zeros((), dtype=torch.float64, device=flat.device) for _ in range(2))
        for start in range(0, flat.numel(), chunk):
            c = flat[start:start + chunk].double()
            alt += (1.0 if start % 2 == 0 else -1.0) * (c[0::2].sum() - c[1::2].sum())
            sq += (c * c).sum()
        out[full_name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = [float(alt), float(sq.sqrt())]
    return out


@pytest.mark.parametrize("chunk", [base.CHECKSUM_CHUNK, 999])  # 999: many chunks, odd ends, a short last one
def test_tensor_checksums_are_bit_identical_to_the_recorded_recipe(model_and_tok, tiny_ckpt, monkeypatch, chunk):
    model, _ = model_and_tok
    monkeypatch.setattr(base, "CHECKSUM_CHUNK", chunk)
    for backbone in (model.backbone, qcd.load_backbone(tiny_ckpt, torch.bfloat16)):  # with LoRA; bf16
        want = reference_checksums(backbone, chunk)
        got = base.tensor_checksums(backbone, tiny_ckpt)
        assert list(got) == list(want) and got == want  # exact floats, same order


def test_gc_paused_nests_across_threads_and_restores_the_collector():
    import gc
    import threading

    from lft.common import gc_paused

    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other():
        with gc_paused():
            inside.set()
            release.wait(10)
    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        inside.wait(10)
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's block is still open
    release.set()
    t.join(10)
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # off before: stays off
    finally:
        gc.enable()


def test_checkpoint_checks(tmp_path, tiny_ckpt):
    with pytest.raises(UserError, match="not a folder"):
        base.check_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        base.check_folder(tmp_path / "empty")
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="only safetensors"):
        base.check_folder(bad)
    idx = tmp_path / "sharded"
    idx.mkdir()
    (idx / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    (idx / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="incomplete download"):
        base.check_folder(idx)


# --- user text stays text -------------------------------------------------------------------------------------

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "<|fim_prefix|>",
           "<|vision_pad|>", "<|box_start|>", "<tool_response>"]


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    return qcd.load_tokenizer(tiny_ckpt)


def test_special_token_strings_encode_as_text(tokenizer):
    first_special = 151643  # <|endoftext|>; every added token's id is at or above it
    assert tokenizer.pad_token_id == first_special
    for s in SPECIAL:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        assert len(ids) > 1 and max(ids) < first_special, s
        assert tokenizer.decode(ids) == s


def test_no_string_a_user_types_produces_a_special_token_id(tokenizer):
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    pieces = st.one_of(st.sampled_from(SPECIAL), st.text(max_size=6), st.sampled_from(["<|", "|>", "<", ">", "|"]))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(pieces, max_size=8).map("".join))
    @example("\U0002f800<|endoftext|>")  # found by a CI run: a compatibility ideograph next to a special token
    def check(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert all(i < 151643 for i in ids), (text, ids)
        # Qwen3's tokenizer normalises to NFC first, so the text comes back canonically equal: a CJK
        # compatibility ideograph such as U+2F800 decodes as its unified twin U+4E3D
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)

    check()


def test_tokenizer_gives_transformers_ids(tokenizer, tiny_ckpt, demo_data):
    """load_tokenizer reads tokenizer.json with the `tokenizers` library alone; transformers' AutoTokenizer, set up
    as the toolkit set it up before (split special tokens, every added token special), gives the same ids for
    the demo texts and hostile strings, and the same pad token."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from transformers import AutoTokenizer

    from lft.data import load_split

    ref = AutoTokenizer.from_pretrained(str(tiny_ckpt), local_files_only=True, split_special_tokens=True)
    qcd.text_only(ref.backend_tokenizer)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == (ref.pad_token, ref.pad_token_id) == ("<|endoftext|>", 151643)
    texts = list(load_split(demo_data["train"]).texts) + SPECIAL + [
        "a<|im_start|>b<|im_end|>", "  spaces\tand\nlines  ", "\u200b\u200d", "emoji 😀👍🏽", "Ｆｕｌｌ　ｗｉｄｔｈ",
        "\x00\x01 control", "ﬁ ligature", "x" * 500, "", "e\u0301", "It's 12,345.6 don't", "\r\n\r\n", "\U0002f800"]
    for text in texts:
        assert tokenizer(text)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"], text

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=40))
    def check(text):
        assert tokenizer(text)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]

    check()


def test_a_trailing_endoftext_changes_nothing_but_its_own_characters(model_and_tok, tokenizer):
    """The string "<|endoftext|>" at the end of a text is classified as those characters: the logits are those of
    the text with the characters, never of the text alone (which is what a pad token would make them)."""
    model, _ = model_and_tok
    a = tokenizer("出售假证件<|endoftext|>", add_special_tokens=False)["input_ids"]
    b = tokenizer("出售假证件", add_special_tokens=False)["input_ids"]
    assert a[:len(b)] == b and len(a) > len(b)
    with torch.no_grad():
        la, lb = model(**collate_padded([a], 151643)), model(**collate_padded([b], 151643))
    assert not torch.allclose(la, lb)


# --- merged export precision ------------------------------------------------------------------------------------

def test_merged_export_dtype_default_is_the_base_dtype(model_and_tok, tiny_ckpt, tmp_path):
    model, tok = model_and_tok
    meta = {"labels": list(DEFAULT_LABELS), "max_length": 64, "args": {}, "metrics": None,
            "base": base_identity(tiny_ckpt, model.backbone)}
    assert adapter.base_dtype(tiny_ckpt) == torch.float32  # the tiny checkpoint is saved in float32
    texts = ["今天天气很好", "出售假证件，量大从优", "某些人就是素质低", "hello 世界"] * 8
    enc = collate_padded(encode(tok, texts), tok.pad_token_id)
    with torch.no_grad():
        ref = torch.softmax(model(**enc), -1)
    for dtype, tol in ((adapter.base_dtype(tiny_ckpt), 1e-5), (torch.bfloat16, 0.05)):
        adapter.export_merged(model, tok, tmp_path / str(dtype), meta, dtype=dtype)
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / str(dtype), dtype=torch.float32).eval()
        with torch.no_grad():
            got = torch.softmax(hf(**enc).logits.float(), -1)
        assert (got - ref).abs().max().item() <= tol, dtype
        if dtype == torch.float32:
            assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_merge_with_mean_pooling_fails_at_argument_checking(tiny_ckpt, demo_data, tmp_path):
    import train_lora

    with pytest.raises(UserError, match="--merge .* --pooling mean .* predict.py"):
        train_lora.parse_args(["--checkpoint", str(tiny_ckpt), "--train_data", str(demo_data["train"]),
                               "--val_data", str(demo_data["val"]), "--output_dir", str(tmp_path / "o"),
                               "--merge", "--pooling", "mean"])
    assert not (tmp_path / "o").exists()


def test_compiled_layers_take_no_float_inputs_and_share_one_graph(tiny_ckpt):
    """The decoder layers compile with dynamic shapes, but their float attributes (RMSNorm eps, attention
    scaling, LoRA scaling and dropout p) stay constants: as graph inputs they were 0-dim CPU tensors that made
    inductor build CPU kernels beside the GPU ones (an H200's first 1.7B training step: 104 s cold, run 18).
    One graph serves every layer, in training (forward + backward) as in evaluation; logits equal eager."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() == 0])
        return gm.forward

    torch._dynamo.reset()
    try:
        model = qcd.build_classifier(tiny_ckpt, DEFAULT_LABELS, lora={"r": 8, "alpha": 16, "dropout": 0.1})[0]
        enc = collate_packed([[100 + k] * (5 + 3 * k) for k in range(3)])
        model.eval()
        with torch.no_grad():
            eager = model(**enc)
        qcd.compile_decoder_layers(model, backend=backend)
        with torch.no_grad():
            compiled = model(**enc)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
        model.train()
        model(**enc).sum().backward()
        model(**collate_packed([[7] * 11, [9] * 4])).sum().backward()  # other widths: the same dynamic graph
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 2, f"{len(graphs)} graphs for {len(model.base_model.layers)} layers in 2 modes"
    assert graphs == [[], []], "float attributes became graph inputs"


def test_a_stand_in_layer_compiles_the_graph_the_model_then_uses(tiny_ckpt):
    """train_lora.py compiles the layers' training graph on a stand-in layer while the weights load
    (qcd.warm_compile): the model's layers must then find that graph (no second one is made), give eager's
    logits, and the stand-in must draw nothing from the CPU's random generator (the model's LoRA and head
    initialisation draw from it meanwhile; with dropout off here, as a CPU stand-in's dropout would draw from it)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(len(example_inputs))
        return gm.forward

    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj", "o_proj"]}
    torch._dynamo.reset()
    try:
        state = torch.random.get_rng_state()
        qcd.warm_compile(qcd.read_config(tiny_ckpt), torch.float32, lora, 3, 16, "cpu", contextlib.nullcontext,
                         backend=backend)
        assert torch.equal(torch.random.get_rng_state(), state), "the stand-in drew from the CPU generator"
        assert len(graphs) == 1
        torch.manual_seed(0)
        model = qcd.build_classifier(tiny_ckpt, DEFAULT_LABELS, dropout=0.0, lora=lora)[0]
        enc = collate_packed([[100 + k] * (5 + 3 * k) for k in range(3)])
        model.train()
        eager = model(**enc)
        qcd.compile_decoder_layers(model, backend=backend)
        compiled = model(**enc)
        compiled.sum().backward()
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1, "the model's layers compiled a graph of their own"
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_building_and_running_the_decoder_imports_no_dynamo(tiny_ckpt):
    """load_backbone builds the decoder on the meta device, where nn.Embedding's own initialisation and inv_freq's
    arithmetic would go through torch._refs, which imports torch._dynamo (1.2-2.4 s of a CPU job that never
    compiles): nothing is computed there. new_backbone (the benches' random decoder) sets inv_freq as loading does."""
    import subprocess
    import sys

    from conftest import subprocess_env

    code = ("import sys, torch, qwen3_classification_direct as q; m = q.load_backbone(sys.argv[1]); "
            "m(torch.tensor([[1, 2, 3]])); print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_ckpt)], env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"
    loaded = qcd.load_backbone(tiny_ckpt)
    config = json.loads((tiny_ckpt / "config.json").read_text())
    drawn = qcd.new_backbone(config, torch.float32)
    assert torch.equal(drawn.inv_freq, loaded.inv_freq) and loaded.inv_freq.dtype == torch.float32
    assert drawn.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_inductor_chooses_by_rule_unless_the_user_says_otherwise(monkeypatch):
    """Inductor's timing of a reduction's candidate block sizes changes the order of its sums, so two identical GPU
    runs could train to different losses: the layers compile in its deterministic mode, where the choice is made by
    rule. TORCHINDUCTOR_DETERMINISTIC (torch's own variable) still decides where it is set."""
    import torch._inductor.config as inductor_config

    monkeypatch.delenv("TORCHINDUCTOR_DETERMINISTIC", raising=False)
    monkeypatch.setattr(inductor_config, "deterministic", False)
    qcd._compile_settings()  # what compile_decoder_layers and warm_compile apply
    assert inductor_config.deterministic is True
    monkeypatch.setattr(inductor_config, "deterministic", False)
    monkeypatch.setenv("TORCHINDUCTOR_DETERMINISTIC", "0")
    qcd._compile_settings()
    assert inductor_config.deterministic is False


# --- our decoder and LoRA against transformers and peft themselves ------------------------------------------

def _hf_with_peft(tiny_ckpt, seed, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Model

    hf = Qwen3Model.from_pretrained(tiny_ckpt, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(lora.get("targets", qcd.LORA_TARGETS)), bias="none")
    return get_peft_model(hf, config, autocast_adapter_dtype=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decoder_equals_transformers_qwen3model_padded_and_packed(tiny_ckpt, attn):
    """Hidden states of every real token equal transformers' Qwen3Model's: right and left padding, and a packed row
    (transformers derives the same block-diagonal mask from the restarting position ids)."""
    from transformers import Qwen3Model

    ours = qcd.load_backbone(tiny_ckpt, torch.float32, attn)
    hf = Qwen3Model.from_pretrained(tiny_ckpt, dtype=torch.float32, attn_implementation=attn).eval()
    tok = qcd.load_tokenizer(tiny_ckpt)
    seqs = encode(tok)
    with torch.no_grad():
        for side in ("right", "left"):
            enc = collate_padded(seqs, tok.pad_token_id, side)
            real = enc["attention_mask"].bool()
            a = ours(enc["input_ids"], attention_mask=enc["attention_mask"])
            b = hf(**enc, use_cache=False).last_hidden_state
            assert (a - b)[real].abs().max().item() <= 1e-5, side
        enc = collate_packed(seqs)
        a = ours(enc["input_ids"], position_ids=enc["position_ids"], cu_seqlens=enc["cu_seqlens"], max_len=enc["max_len"])
        b = hf(input_ids=enc["input_ids"], position_ids=enc["position_ids"], use_cache=False).last_hidden_state
        assert (a - b).abs().max().item() <= 1e-5


def test_lora_equals_peft_from_the_same_seed_in_training_and_evaluation(tiny_ckpt):
    """A seed gives peft's adapter weights, and the same outputs and gradients, dropout masks included: the
    golden losses of runs made with peft still hold."""
    lora = dict(r=4, alpha=8, dropout=0.1)
    ref = _hf_with_peft(tiny_ckpt, 7, **lora)
    model = qcd.Qwen3Classifier(qcd.load_backbone(tiny_ckpt), 6, 0.0)
    torch.manual_seed(7)
    qcd.add_lora(model, **lora)
    ours = model.backbone
    ref_state = {k.removeprefix("base_model.model.").replace(".default", ""): v
                 for k, v in ref.named_parameters() if "lora_" in k}
    our_state = {k.replace(".default", ""): v for k, v in ours.named_parameters() if "lora_" in k}
    assert ref_state.keys() == our_state.keys() and len(our_state) == 2 * 4 * 2
    assert all(torch.equal(ref_state[k], our_state[k]) for k in our_state)
    with torch.no_grad():  # non-zero B, the same in both
        for k in our_state:
            if "lora_B" in k:
                our_state[k].normal_(0, 0.1)
                ref_state[k].copy_(our_state[k])
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n.removeprefix("base_model.model.") for n, p in ref.named_parameters() if p.requires_grad]
    ids = torch.tensor(encode(qcd.load_tokenizer(tiny_ckpt), TEXTS[1:2]))
    for train in (True, False):
        ours.train(train), ref.train(train)
        torch.manual_seed(11)
        a = ours(ids)
        torch.manual_seed(11)
        b = ref(input_ids=ids, use_cache=False).last_hidden_state
        assert (a - b).abs().max().item() <= 1e-6, train
        a.square().sum().backward(), b.square().sum().backward()
        grads = {k: v.grad for k, v in our_state.items()}
        assert all(torch.allclose(grads[k], ref_state[k].grad, atol=1e-6, rtol=1e-4) for k in grads)
        for p in [*our_state.values(), *ref_state.values()]:
            p.grad = None


def test_saved_adapter_loads_in_peft_and_merges_as_peft_does(model_and_tok, tiny_ckpt, tmp_path):
    """adapter_model.safetensors / adapter_config.json are peft's format: peft's own loader puts them on
    transformers' Qwen3Model and gets our hidden states; our merge gives peft's merged weights."""
    from peft import PeftModel
    from transformers import Qwen3Model

    model, tok = model_and_tok
    adapter.save_adapter(model, tmp_path / "a", {"labels": list(DEFAULT_LABELS), "max_length": 64, "args": {},
                                                 "base": base_identity(tiny_ckpt, model.backbone)})
    ref = PeftModel.from_pretrained(Qwen3Model.from_pretrained(tiny_ckpt, dtype=torch.float32), tmp_path / "a").eval()
    enc = collate_padded(encode(tok), tok.pad_token_id)
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        a = model.backbone(enc["input_ids"], attention_mask=enc["attention_mask"])
        b = ref(**enc, use_cache=False).last_hidden_state
    assert (a - b)[real].abs().max().item() <= 1e-5
    import copy

    merged = qcd.merge_lora(copy.deepcopy(model.backbone)).state_dict()
    want = ref.merge_and_unload().state_dict()
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k]) for k in want)
    assert not qcd.lora_layers(qcd.merge_lora(copy.deepcopy(model.backbone)))


@pytest.mark.parametrize("field, value, message", [
    ("use_dora", True, "use_dora True is not supported"),
    ("rank_pattern", {"q_proj": 16}, "rank_pattern"),
    ("target_modules", "q_proj|v_proj", "target_modules must be a list"),
    ("r", 0, "r must be a positive integer"),
    ("lora_alpha", float("nan"), "lora_alpha must be a positive number"),
])
def test_adapter_config_the_toolkit_does_not_compute_is_refused(model_and_tok, tiny_ckpt, tmp_path, field, value,
                                                                message):
    model, _ = model_and_tok
    adapter.save_adapter(model, tmp_path / "a", {"labels": list(DEFAULT_LABELS), "max_length": 64, "args": {},
                                                 "base": base_identity(tiny_ckpt, model.backbone)})
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, field: value}))
    with pytest.raises(UserError, match=message):
        adapter.load_classifier(tiny_ckpt, tmp_path / "a")


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"use_sliding_window": True, "sliding_window": 128}, "sliding-window attention"),
])
def test_a_qwen3_config_the_decoder_does_not_implement_is_refused(tiny_ckpt, tmp_path, change, message):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        qcd.build_classifier(folder)


@pytest.mark.parametrize("content, message", [("{broken", "not valid JSON"), ("[1, 2]", "holds a list, not a JSON object")])
def test_an_adapter_config_that_is_not_a_json_object_is_one_line(model_and_tok, tiny_ckpt, tmp_path, content, message):
    model, _ = model_and_tok
    adapter.save_adapter(model, tmp_path / "a", {"labels": list(DEFAULT_LABELS), "max_length": 64, "args": {},
                                                 "base": base_identity(tiny_ckpt, model.backbone)})
    (tmp_path / "a" / "adapter_config.json").write_text(content)
    with pytest.raises(UserError, match=f"adapter_config.json: {message}.*the adapter is damaged"):
        adapter.load_classifier(tiny_ckpt, tmp_path / "a")


def test_an_adapter_peft_wrote_loads_to_the_same_logits(model_and_tok, tiny_ckpt, tmp_path):
    """Adapters saved before the decoder was our own were written by peft itself (save_pretrained): the same
    weights in peft's files load to the logits of ours. And the merged folder's tokenizer loads in transformers
    with our pad token and ids."""
    from peft import get_peft_model_state_dict
    from transformers import AutoTokenizer

    model, tok = model_and_tok
    meta = {"labels": list(DEFAULT_LABELS), "max_length": 64, "args": {"lora_r": 4, "lora_alpha": 8},
            "base": base_identity(tiny_ckpt, model.backbone)}
    adapter.save_adapter(model, tmp_path / "ours", meta)
    ref = _hf_with_peft(tiny_ckpt, 0, r=4, alpha=8, dropout=0.0)
    ours = {k.replace(".default", ""): v for k, v in model.backbone.named_parameters() if "lora_" in k}
    with torch.no_grad():
        for k, v in ref.named_parameters():
            if "lora_" in k:
                v.copy_(ours[k.removeprefix("base_model.model.").replace(".default", "")])
    ref.save_pretrained(tmp_path / "peft")
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("head.safetensors", "classifier_config.json"):
        (folder / name).write_bytes((tmp_path / "ours" / name).read_bytes())
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (folder / name).write_bytes((tmp_path / "peft" / name).read_bytes())
    assert set(get_peft_model_state_dict(ref)) == set(adapter.adapter_state(model))
    loaded, _, _ = adapter.load_classifier(tiny_ckpt, folder)
    enc = collate_padded(encode(tok), tok.pad_token_id)
    with torch.no_grad():
        assert torch.equal(loaded(**enc), model(**enc))
    adapter.export_merged(loaded, tok, tmp_path / "merged", meta, dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert (hf_tok.pad_token, hf_tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert [hf_tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS] == encode(tok)
