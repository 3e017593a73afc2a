"""--quantize on CPU: int8 end to end (API and test_saved_lora.py), exactly the base projections and the embeddings
quantised, LoRA and head untouched, predictions close to the float model, a bf16 base loaded as stored and quantised
to exactly what a float32 load gives; fp8 without a GPU and a missing torchao are one-line errors. The fp8 speed path
runs on the GPU machine (bench/bench_quant.py)."""
import importlib.util
import json
import re

import numpy as np
import pytest
import torch

import test_saved_lora
import train_lora
from lft import quantize as Q
from lft.common import UserError, run_cli
from lft.predict import Classifier
from lft.tables import read_table
from test_train import base_args

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
PROJ = ("self_attn.q_proj.base_layer", "self_attn.k_proj.base_layer", "self_attn.v_proj.base_layer",
        "self_attn.o_proj.base_layer", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# measured on the tiny model (torch 2.13 CPU, torchao 0.18): max |dp| 0.015 unmerged, 0.011 merged
PROB_TOL = 0.05


@pytest.fixture(scope="module")
def trained(tiny_ckpt, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "run"
    assert train_lora.main(base_args(tiny_ckpt, demo_data, out, "--num_epochs", "1", "--logging_steps", "27")) == 0
    texts = list(read_table(demo_data["test"])["text_cn"])
    clf = Classifier.load(out / "best_model", device="cpu")
    return out / "best_model", texts, clf.predict_proba(texts)


def quantised_names(model) -> set[str]:
    """int8's Int8Linear modules, and Linears whose weight torchao quantised (fp8, on the GPU). nn.Linear only: a LoRA
    layer holds its base_layer."""
    from torchao.utils import TorchAOBaseTensor

    return {n for n, m in model.named_modules() if type(m) is Q.int8_linear_class()
            or type(m) is torch.nn.Linear and isinstance(m.weight, TorchAOBaseTensor)}


def test_int8_quantises_exactly_the_base_projections(trained):
    folder, texts, P0 = trained
    clf = Classifier.load(folder, device="cpu", quantize="int8")
    assert clf.quantize == "int8"
    layers = clf.model.base_model.layers
    prefix = "backbone.layers"
    expected = {f"{prefix}.{i}.{p}" for i in range(len(layers)) for p in PROJ}
    assert quantised_names(clf.model) == expected
    float_weights = {n: p for n, p in clf.model.named_parameters() if "lora_" in n or n == "score.weight"}
    assert len(float_weights) == 2 * 4 * len(layers) + 1  # lora_A/B on q/k/v/o, and the head
    assert all(type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in float_weights.values())
    emb = clf.model.base_model.embed_tokens
    assert type(emb) is Q.int8_embedding_class() and emb.qweight.dtype == torch.int8
    norms = [p for n, p in clf.model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    P = clf.predict_proba(texts)
    assert np.abs(P - P0).max() < PROB_TOL
    assert (P.argmax(1) == P0.argmax(1)).mean() >= 0.95


def test_int8_on_cpu_runs_small_forwards_and_gives_their_memory_back(trained, monkeypatch):
    """int8 on the CPU caps a forward at INT8_CPU_ROW_TOKENS (max_length where longer) and hands the memory each
    forward freed back to the system; float modes keep the asked-for rows and skip the trim."""
    from lft import predict as P

    folder, texts, _ = trained
    trims = []
    monkeypatch.setattr(P, "release_freed_memory", lambda: trims.append(1))
    clf = Classifier.load(folder, device="cpu", quantize="int8", max_tokens=100_000)
    assert clf.max_tokens == max(Q.INT8_CPU_ROW_TOKENS, clf.max_length)
    ids = clf.encode(texts * 40)
    batches = clf.predictor.batches(np.array([len(x) for x in ids]), max_tokens=100_000)
    assert len(batches) > 1 and clf.predictor.row_tokens == clf.max_tokens
    assert all(len(b) * max(len(ids[i]) for i in b) <= clf.max_tokens for b in batches)  # padded batches
    clf.predictor.probs(ids, batches)
    assert len(trims) == len(batches)
    assert Q.forward_tokens("int8", "cpu", 100, 2048) == 100 and Q.forward_tokens("int8", "cpu", 10**6, 2048) == 2048
    trims.clear()
    fp32 = Classifier.load(folder, device="cpu", max_tokens=100_000)
    assert fp32.max_tokens == 100_000 and Q.forward_tokens("none", "cpu", 10**6, 256) == 10**6
    fp32.predict_proba(texts)
    assert not trims


def test_int8_after_merging_lora(trained):
    folder, texts, P0 = trained
    clf = Classifier.load(folder, device="cpu")
    names = Q.quantize_model(clf.model, "int8", clf.runtime, merge=True)
    assert names[-1] == "backbone.embed_tokens" and set(names[:-1]) == quantised_names(clf.model)
    assert sorted(names[:-1]) == sorted(f"backbone.layers.{i}.{p.removesuffix('.base_layer')}" for i in range(2)
                                        for p in PROJ)
    assert not any("lora_" in n for n, _ in clf.model.named_parameters())
    P = clf.predict_proba(texts)
    assert np.abs(P - P0).max() < PROB_TOL and (P.argmax(1) == P0.argmax(1)).mean() >= 0.95


def test_int8_embedding_gathers_then_dequantises():
    """Int8Embedding: int8 rows, one scale per row; a lookup equals looking up the dequantised table, and every
    value is within half a quantisation step of the float row it came from."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(1000, 48)
    emb.weight.data[7] = 0.0  # an all-zero row (a pad row) stays exactly zero
    q = Q.int8_embedding_class()(emb, torch.float32)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (1000, 1) and q.scale.dtype == torch.float32
    ids = torch.tensor([[0, 7, 999, 7, 5]])
    table = q.qweight.float() * q.scale
    assert torch.equal(q(ids), torch.nn.functional.embedding(ids, table))
    assert torch.equal(q(ids)[0, 1], torch.zeros(48))
    step = emb.weight.abs().amax(1, keepdim=True) / 127
    assert ((table - emb.weight).abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("uint8", [True, False])
def test_int8_linear_gives_torchaos_numbers_bit_for_bit(uint8):
    """Int8Linear takes the weight's column sums once instead of at every call; its outputs are torchao's own int8
    linear's exactly, by either kernel (VNNI's uint8 x int8 with the correction, or int8 x int8), for float32 and
    bf16 activations, one token or a batch, with a bias; and a weight torchao did not quantise with the int8 config
    is refused."""
    import copy

    tq = Q.import_torchao()
    torch.manual_seed(0)
    ref = torch.nn.Linear(96, 40)
    tq.quantize_(ref, Q.config_for("int8"))
    ours = Q.int8_linear_class()(copy.deepcopy(ref))
    if uint8 and ours.compensation is None:
        pytest.skip("torchao takes the int8 x int8 kernel on this CPU or torch")
    if not uint8:
        ours.uint8, ours.compensation = False, None
    assert ours.qweight.dtype == torch.int8 and ours.qweight.shape == (40, 96)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((1, 96), (3, 7, 96)):
            x = (torch.randn(shape) * 3).to(dtype)
            with torch.inference_mode():
                want, got = ref(x), ours(x)
            assert got.dtype == want.dtype == dtype and torch.equal(got, want), (dtype, shape)
    with pytest.raises(TypeError, match="config_for"):
        Q.int8_linear_class()(torch.nn.Linear(8, 8))


def test_int8_of_a_bf16_base_loads_it_as_stored_and_matches_a_float32_load(trained, tiny_ckpt, tmp_path, monkeypatch):
    """A Qwen3 checkpoint stores bf16: int8 on the CPU loads it in bf16 (no float32 copy of the model) and widens a
    projection at a time while quantising. The result is exactly what quantising a float32 load gives: the same
    int8 weights, the same probabilities, norms in float32. And it holds well under half the float32 model's
    bytes, none of them in the memory-mapped checkpoint, with --bf16 too."""
    from transformers import Qwen3ForCausalLM

    import qwen3_classification_direct as qcd
    from lft import adapter
    from lft.predict import runtime_args
    from lft.runtime import resolve

    folder, texts, _ = trained
    bf16 = tmp_path / "qwen3-tiny-bf16"
    Qwen3ForCausalLM.from_pretrained(tiny_ckpt).to(torch.bfloat16).save_pretrained(bf16)
    for f in tiny_ckpt.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "generation")):
            (bf16 / f.name).write_bytes(f.read_bytes())
    loaded = []
    real = qcd.load_backbone
    monkeypatch.setattr(qcd, "load_backbone", lambda ckpt, dtype, *a, **k: loaded.append(dtype) or
                        real(ckpt, dtype, *a, **k))
    clf = Classifier.load(folder, bf16, device="cpu", quantize="int8")
    assert loaded == ["auto"]
    rt = resolve(runtime_args("cpu"), torch.device("cpu"))
    ref, _, _ = adapter.load_classifier(bf16, folder, torch.float32)
    float_bytes = sum(t.numel() * t.element_size() for t in [*ref.parameters(), *ref.buffers()])
    Q.quantize_model(ref, "int8", rt)
    for (n, a), (m, b) in zip(clf.model.state_dict().items(), ref.state_dict().items()):
        assert n == m and type(a) is type(b) and a.dtype == b.dtype, n
        assert torch.equal(a, b), n
    assert all(p.dtype == torch.float32 for n, p in clf.model.named_parameters() if "norm" in n)
    ref_clf = Classifier(ref, clf.tokenizer, clf.meta, rt, clf.max_length, None, "int8")
    assert np.array_equal(clf.predict_proba(texts), ref_clf.predict_proba(texts))
    int8_bytes = sum(t.numel() * t.element_size() for t in [*clf.model.parameters(), *clf.model.buffers()])
    assert int8_bytes < 0.3 * float_bytes, (int8_bytes, float_bytes)  # the embeddings dominate a tiny model
    # --bf16 --quantize int8 keeps the base's float tensors in bf16; none may stay a view of the memory-mapped
    # checkpoint, which would keep the whole file mapped (5.33 GiB resident for the 1.7B shape instead of 2.13)
    for mode_clf in (clf, Classifier.load(folder, bf16, device="cpu", precision="bf16", quantize="int8")):
        mapped = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in open("/proc/self/maps")
                  if line.rstrip().endswith(".safetensors") and str(bf16) in line]
        tensors = [t for _, t in [*mode_clf.model.base_model.named_parameters(),
                                  *mode_clf.model.base_model.named_buffers()] if type(t.data) is torch.Tensor]
        assert tensors and not [t for t in tensors for lo, hi in mapped if lo <= t.data_ptr() < hi]
    assert [p.dtype for n, p in mode_clf.model.named_parameters() if "norm" in n][0] == torch.bfloat16
    assert np.abs(mode_clf.predict_proba(texts) - ref_clf.predict_proba(texts)).max() < PROB_TOL


def test_eval_cli_int8(trained, demo_data, tmp_path, capsys):
    folder, _, _ = trained
    runs = {}
    for mode in ("none", "int8"):
        out = tmp_path / mode
        assert test_saved_lora.main(["--lora_model", str(folder), "--test_data", str(demo_data["test"]),
                                     "--output_dir", str(out), "--predictions_format", "csv", "--no_progress",
                                     "--device", "cpu", "--quantize", mode]) == 0
        runs[mode] = out
    log = capsys.readouterr().out
    assert "not quantised" in log and "quantised int8 (int8 weights + dynamic int8 activations, int8 token " \
                                      "embeddings; base projections and embeddings, LoRA and head float)" in log
    # on a CPU with AMX, --bf16 is faster than int8: the log says so, once (this development machine has none)
    assert log.count("note: --quantize int8 is a memory option here: this CPU has AMX") == int(Q.cpu_has_amx())
    import pandas as pd

    res = {m: json.loads((o / "test_results.json").read_text()) for m, o in runs.items()}
    assert res["none"]["quantize"] == "none" and res["int8"]["quantize"] == "int8"
    a, b = (pd.read_csv(o / "predictions.csv") for o in runs.values())
    assert (a["predicted"] == b["predicted"]).mean() >= 0.95
    probs = [c for c in a.columns if c.startswith("p_")]
    assert np.abs(a[probs].to_numpy() - b[probs].to_numpy()).max() < PROB_TOL


def test_fp8_without_gpu_is_one_line_error(trained, demo_data, tmp_path, capsys):
    folder, _, _ = trained
    rc = run_cli(test_saved_lora.main, ["--lora_model", str(folder), "--test_data", str(demo_data["test"]),
                                        "--output_dir", str(tmp_path / "ev"), "--device", "cpu", "--quantize", "fp8"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: --quantize fp8 needs a CUDA GPU"), err
    assert not (tmp_path / "ev").exists()
    with pytest.raises(UserError, match=re.escape("--quantize fp8 needs a CUDA GPU")):
        Classifier.load(folder, device="cpu", quantize="fp8")


def test_bad_mode_and_missing_torchao(trained, demo_data, capsys, monkeypatch):
    folder, _, _ = trained
    with pytest.raises(SystemExit) as e:
        test_saved_lora.parse_args(["--lora_model", str(folder), "--test_data", str(demo_data["test"]),
                                    "--quantize", "bogus"])
    assert e.value.code == 2 and "--quantize: invalid choice: 'bogus'" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    problems = []
    Q.check_quantize("int8", "cpu", problems)
    assert problems == [f"--quantize int8 needs torchao: pip install torchao=={Q.TORCHAO_VERSION}"]


def test_int8_is_refused_on_a_gpu_and_fp8_is_named(monkeypatch):
    """int8 on a GPU was slower than bf16 at every batch size measured (run 11): refused, pointing at fp8."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for device in ("cuda", "auto"):
        problems = []
        Q.check_quantize("int8", device, problems)
        assert len(problems) == 1 and problems[0].startswith("--quantize int8 is the CPU option: on a GPU it was "
                                                             "slower than bf16") and "--quantize fp8" in problems[0]
    problems = []
    Q.check_quantize("int8", "cpu", problems)
    assert problems == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < Q.FP8_MIN_CAPABILITY,
                    reason="needs a CUDA GPU with fp8 (compute capability >= 8.9)")
def test_gpu_fp8_defaults_agree_with_bf16(trained):
    """The GPU defaults (bf16, packed varlen rows, compiled layers, CUDA graphs) with the base quantised to fp8."""
    folder, texts, _ = trained
    ref = Classifier.load(folder, device="cuda").predict_proba(texts)
    clf = Classifier.load(folder, device="cuda", quantize="fp8")
    assert len(quantised_names(clf.model)) == 2 * len(PROJ)
    P = clf.predict_proba(texts)
    # fp8 (e4m3: 3 mantissa bits) errs ~6% per element, and in the tiny model's 64-wide layers nothing averages out:
    # 0.069 was measured on the H200
    assert np.abs(P - ref).max() < 0.1
    assert (P.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_fp8_leaves_the_first_two_layers_of_a_deep_model_in_bf16():
    """fp8 quantises decoder layers 2 on of a deep model (run 15: all layers agreed with bf16 on 98.4% of texts,
    layers 2-27 on 99.17% at 1.32x); a shallow model keeps at most a quarter of its layers back; int8 quantises
    every layer."""
    assert Q.first_quantised_layer("fp8", 28) == 2 and Q.first_quantised_layer("fp8", 64) == 2
    assert Q.first_quantised_layer("fp8", 2) == 0 and Q.first_quantised_layer("fp8", 7) == 1
    assert Q.first_quantised_layer("int8", 28) == 0
    assert Q.layer_of("backbone.layers.17.mlp.up_proj.base_layer") == 17
    assert Q.layer_of("layers.0.self_attn.q_proj") == 0


def test_native_bf16_and_amx_are_read_from_the_cpu_flags(monkeypatch, tmp_path):
    """The scripts' int8 note names --bf16 only on a CPU with AMX, where --bf16 was the faster option; on AVX512-BF16
    without AMX and on AVX512-VNNI int8 was faster than bf16, and no note is given."""
    import builtins

    real = builtins.open
    for flags, native, amx in (("fpu sse avx512_vnni", False, False), ("fpu avx512f avx512_bf16", True, False),
                               ("fpu avx512_bf16 amx_bf16 amx_int8", True, True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real(info if f == "/proc/cpuinfo" else f, *a, **k))
        assert Q.cpu_has_native_bf16() is native and Q.cpu_has_amx() is amx
        note = Q.int8_note("int8", "cpu")
        assert (note is not None) is amx and (not amx or "this CPU has AMX, where --bf16 ran faster" in note)
        assert Q.int8_note("none", "cpu") is None and Q.int8_note("fp8", "cpu") is None
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert Q.cpu_has_native_bf16() is False and Q.cpu_has_amx() is False and Q.int8_note("int8", "cpu") is None
