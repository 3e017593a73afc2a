"""The CUDA-only paths, on the tiny checkpoint: varlen flash attention over packed rows, compiled layers, CUDA
graphs of training steps and evaluation, the fused AdamW skipping a non-finite update on the device, step flags
read one step late, and the path without flash attention (older GPUs).

Marked `gpu`: skipped without CUDA; run on a GPU machine with `python -m pytest -q -m gpu tests/test_gpu.py`.
Where the result is exact, the assertion is exact.
"""
import json
import re

import pytest
import torch

import qwen3_classification_direct as qcd
import test_saved_lora
import train_lora
from lft import base, cuda_graphs
from lft.common import UserError
from test_faults import poison_training_forward
from test_model import reference_checksums

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def run(ckpt, data, out, *extra):
    """train_lora.main on the tiny model; compiled only where a test says so (compiling costs ~30 s a run and
    the graphs, varlen attention and the optimizer paths are the same without it)."""
    extra = list(map(str, extra))
    fast = [] if "--compile" in extra else ["--compile", "off"]
    if "--cuda_graphs" not in extra and "--packing" not in extra:
        fast += ["--cuda_graphs", "on"]  # the demo set is a small job: auto would leave graphs off
    return train_lora.main(["--checkpoint", str(ckpt), "--train_data", str(data["train"]), "--val_data",
                            str(data["val"]), "--output_dir", str(out), "--max_length", "64", "--batch_size", "8",
                            "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3", "--lora_r", "16",
                            "--lora_alpha", "32", "--logging_steps", "1", "--no_progress", *fast, *extra])


def log(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["macro_f1"] for r in rows if r.get("split") == "val"]


@pytest.fixture
def graph_sets(monkeypatch):
    made = []
    init = cuda_graphs.RowGraphs.__init__

    def recording_init(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(cuda_graphs.RowGraphs, "__init__", recording_init)
    return made


def test_cuda_training_learns_with_graphs_on_held_out_test(tiny_ckpt, demo_data, tmp_path, graph_sets):
    out = tmp_path / "learn"
    assert run(tiny_ckpt, demo_data, out, "--num_epochs", 4, "--eval_steps", 27, "--test_data", demo_data["test"],
               "--compile", "on") == 0
    res = json.loads((out / "test_results.json").read_text())
    assert res["macro_f1"] >= 0.9, res["macro_f1"]
    # training steps and validation rows recur, so their shapes are captured (a shape runs eagerly on first use);
    # the test set is evaluated once, so its graph set may capture nothing
    train_graphs, val_graphs = graph_sets[:2]
    assert train_graphs.captures > 0 and val_graphs.captures > 0


def test_graph_replays_equal_eager_steps(tiny_ckpt, demo_data, tmp_path):
    same = ("--num_epochs", 1, "--lora_dropout", 0, "--dropout", 0, "--eval_steps", 9)
    assert run(tiny_ckpt, demo_data, tmp_path / "on", *same) == 0
    assert run(tiny_ckpt, demo_data, tmp_path / "off", *same, "--cuda_graphs", "off") == 0
    (la, fa), (lb, fb) = log(tmp_path / "on"), log(tmp_path / "off")
    assert len(la) == len(lb) == 27
    assert la[:5] == lb[:5]  # the same kernels on the same rows: bitwise equal before bf16 drift compounds
    assert fa == pytest.approx(fb, abs=0.05)


def test_evaluation_graphs_equal_eager(tiny_ckpt, demo_data, tmp_path):
    assert run(tiny_ckpt, demo_data, tmp_path / "m", "--num_epochs", 2, "--eval_steps", 27) == 0
    results = {}
    for flag in ("on", "off"):
        assert test_saved_lora.main(["--lora_model", str(tmp_path / "m" / "best_model"), "--checkpoint",
                                     str(tiny_ckpt), "--test_data", str(demo_data["test"]), "--output_dir",
                                     str(tmp_path / flag), "--cuda_graphs", flag, "--predictions_format", "csv",
                                     "--compile", "off"]) == 0
        results[flag] = json.loads((tmp_path / flag / "test_results.json").read_text())
    assert results["on"]["confusion_matrix"] == results["off"]["confusion_matrix"]


def test_one_nan_step_is_skipped_on_the_device(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    poison_training_forward(monkeypatch, {12})
    out = tmp_path / "skip"
    assert run(tiny_ckpt, demo_data, out, "--num_epochs", 1, "--save_steps", 1, "--save_total_limit", 30,
               "--cuda_graphs", "off") == 0
    a, b, c = (load_file(str(out / f"checkpoint-{s}" / "head.safetensors"))["score.weight"] for s in (11, 12, 27))
    assert torch.equal(a, b) and not torch.equal(b, c) and bool(torch.isfinite(c).all())


def test_a_run_of_nan_steps_stops_with_flags_read_one_step_late(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    poison_training_forward(monkeypatch, range(8, 10_000))
    out = tmp_path / "stop"
    with pytest.raises(UserError, match="3 consecutive steps with a non-finite loss \\(the last at step 10\\)"):
        run(tiny_ckpt, demo_data, out, "--num_epochs", 1, "--eval_steps", 5, "--save_steps", 5,
            "--max_nonfinite_steps", 3, "--cuda_graphs", "off")
    assert bool(torch.isfinite(load_file(str(out / "best_model" / "head.safetensors"))["score.weight"]).all())


def test_without_flash_attention_sdpa_path_learns(tiny_ckpt, demo_data, tmp_path):
    """What a GPU without flash varlen (compute capability < 8.0) runs: padded sdpa batches, no graphs."""
    out = tmp_path / "sdpa"
    assert run(tiny_ckpt, demo_data, out, "--num_epochs", 3, "--eval_steps", 27, "--packing", "off",
               "--attn_implementation", "sdpa", "--test_data", demo_data["test"]) == 0
    assert json.loads((out / "test_results.json").read_text())["macro_f1"] >= 0.9


def test_fp16_graph_replays_equal_eager_fp16_steps(tiny_ckpt, demo_data, tmp_path, graph_sets):
    """--fp16 captures the loss-scaled step: the same losses as eager fp16 steps, overflow skips included (the
    GradScaler starts at 65,536, so the first steps overflow and are skipped in both runs alike)."""
    same = ("--num_epochs", 1, "--lora_dropout", 0, "--dropout", 0, "--eval_steps", 9, "--fp16")
    assert run(tiny_ckpt, demo_data, tmp_path / "on", *same) == 0
    assert any(g.captures > 0 for g in graph_sets[:1])  # the training steps ran as graphs
    assert run(tiny_ckpt, demo_data, tmp_path / "off", *same, "--cuda_graphs", "off") == 0
    (la, fa), (lb, fb) = log(tmp_path / "on"), log(tmp_path / "off")
    assert len(la) == len(lb) == 27
    assert la[:5] == lb[:5]
    assert fa == pytest.approx(fb, abs=0.05)


def test_graphs_share_one_memory_pool_and_eager_runs_allocate_from_it(tiny_ckpt, demo_data, tmp_path, graph_sets):
    assert run(tiny_ckpt, demo_data, tmp_path / "m", "--num_epochs", 1, "--eval_steps", 9) == 0
    assert len(graph_sets) == 2 and all(g.captures > 0 for g in graph_sets)  # training steps and validation
    assert list(cuda_graphs._SHARED) == [torch.device("cuda", 0)]  # one pool for both
    pool, _ = cuda_graphs._SHARED[torch.device("cuda", 0)]
    assert pool.snapshot()  # the graphs' (and eager runs') blocks are in it


def test_the_memory_plan_caps_rows_on_a_small_budget_and_the_run_completes(tiny_ckpt, demo_data, tmp_path,
                                                                           monkeypatch, capsys):
    """A budget with room for rows of ~200 tokens (the tiny model's real need is far below the H200): the plan
    caps training rows at 128 tokens, the graph pool is sized for them, micro-batches are split, and the run
    ends with the same kind of results (not run on a GPU yet: written after the session's device time)."""
    from lft import memory

    real = memory.plan_rows

    def tight(probe, budget, want, max_length, eval_tokens=0, step=memory.ROW_STEP):
        budget = int((probe.before + probe.per_token * 200) / (1 - memory.HEADROOM))
        return real(probe, budget, want, max_length, 0, step)

    monkeypatch.setattr(memory, "plan_rows", tight)
    out = tmp_path / "capped"
    assert run(tiny_ckpt, demo_data, out, "--num_epochs", 2, "--eval_steps", 27) == 0
    printed = capsys.readouterr().out
    assert "training rows are capped at 128 tokens" in printed and "capped to fit the GPU's memory" in printed
    losses, f1 = log(out)
    assert len(losses) == 54 and all(x == x for x in losses) and f1[-1] >= 0.5


@pytest.mark.parametrize("chunk", [base.CHECKSUM_CHUNK, 999])
def test_tensor_checksums_on_the_device_are_bit_identical_to_the_recorded_recipe(tiny_ckpt, monkeypatch, chunk):
    """What adapters recorded on a GPU (the recipe, run on the device) is what the fast version gives there."""
    monkeypatch.setattr(base, "CHECKSUM_CHUNK", chunk)
    for dtype in (torch.bfloat16, torch.float32):
        backbone = qcd.load_backbone(tiny_ckpt, dtype).to("cuda")
        want = reference_checksums(backbone, chunk)
        got = base.tensor_checksums(backbone, tiny_ckpt)
        assert list(got) == list(want) and got == want


@pytest.mark.parametrize("chunk", [qcd.READ_CHUNK, 4096 + 6])  # 4096 + 6: many reads, ends inside tensors
def test_weights_read_straight_to_the_gpu_equal_the_mapped_files(tiny_ckpt, tmp_path, monkeypatch, chunk):
    """read_to_gpu gives exactly the tensors of the memory-mapped path, moved: in the stored dtype and cast, from a
    Qwen3ForCausalLM folder and a merged folder (names under "model.", a score head that is not read)."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(qcd, "READ_CHUNK", chunk)
    merged = tmp_path / "merged"
    merged.mkdir()
    for f in tiny_ckpt.iterdir():
        if f.suffix != ".safetensors":
            (merged / f.name).write_bytes(f.read_bytes())
    state = load_file(str(tiny_ckpt / "model.safetensors"))
    save_file({**{k: v.to(torch.bfloat16) for k, v in state.items()}, "score.weight": torch.ones(6, 64)},
              str(merged / "model.safetensors"))
    for folder in (tiny_ckpt, merged):
        for dtype in (torch.bfloat16, torch.float32):
            want = qcd.load_backbone(folder, dtype).to("cuda").state_dict()
            got = qcd.load_backbone(folder, dtype, device="cuda").state_dict()
            assert list(got) == list(want)
            assert all(got[k].device.type == "cuda" and got[k].dtype == dtype and torch.equal(got[k], want[k])
                       for k in want)


def test_a_row_that_peaks_over_the_plan_narrows_the_cap_before_training(tiny_ckpt, demo_data, tmp_path,
                                                                         monkeypatch, capsys):
    """The plan allows rows of 256 tokens, but the budget (from the probe's own numbers) has room for ~150: the
    widest row, run in the graph pool before training, peaks over it, so the cap narrows and the run
    completes (a 14 GiB cap ran out of memory steps after start-up in run 9: the probe's estimate was short)."""
    from lft import memory

    probes = []

    def generous(probe, budget, want, max_length, eval_tokens=0, step=memory.ROW_STEP):
        probes.append(probe)
        return memory.Plan(256, 0, budget, "memory: rows capped at 256 tokens (test)")

    def budget(device):
        if not probes:
            return real_budget(device)
        p = probes[0]
        return int((p.before + p.per_token * 150) / (1 - memory.HEADROOM))

    real_budget = memory.budget
    monkeypatch.setattr(memory, "plan_rows", generous)
    monkeypatch.setattr(memory, "budget", budget)
    out = tmp_path / "narrowed"
    assert run(tiny_ckpt, demo_data, out, "--num_epochs", 1, "--eval_steps", 27) == 0
    printed = capsys.readouterr().out
    m = re.search(r"a row of 256 tokens peaked at [\d.]+ GiB, over the [\d.]+ GiB the plan allows; training "
                  r"rows are capped at (\d+) tokens", printed)
    assert m and 64 <= int(m[1]) < 256, printed  # narrower, and never under one text of max_length (64)
    assert f"rows of <= {m[1]} tokens" in printed  # the banner shows the narrowed cap
    losses, _ = log(out)
    assert len(losses) == 27 and all(x == x for x in losses)


def test_classifier_compiled_with_few_row_shapes_equals_eager(tiny_ckpt, demo_data, tmp_path):
    """Classifier.load on the GPU compiles while loading (one placeholder row), then large rows come in few shapes
    (lft.data.eval_shape: full rows one width and slot count, the last row wider than its tokens): probabilities
    equal the eager path's (no compile, no graphs, no fixed shapes) to bf16 rounding, labels equal."""
    from lft.predict import Classifier, runtime_args
    from lft.tables import read_table

    assert run(tiny_ckpt, demo_data, tmp_path / "m", "--num_epochs", 1, "--eval_steps", 27) == 0
    model = tmp_path / "m" / "best_model"
    texts = read_table(demo_data["test"])["text_cn"].astype(str).tolist() * 12
    fast = Classifier.load(model, tiny_ckpt, args=runtime_args("cuda", compile="on", cuda_graphs="on"))
    assert fast.compile_seconds > 0
    plain = Classifier.load(model, tiny_ckpt, args=runtime_args("cuda", compile="off", cuda_graphs="off"))
    a, b = fast.predict_proba(texts), fast.predict_proba(texts)  # first pass: eager first uses; second: replays
    ref = plain.predict_proba(texts)
    assert fast.predictor._graphs.captures > 0
    assert abs(a - ref).max() < 0.02 and abs(b - ref).max() < 0.02
    assert (a.argmax(1) == ref.argmax(1)).mean() >= 0.99 and abs(b - a).max() < 1e-3


def test_the_layers_graph_compiled_ahead_is_the_one_the_run_uses(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """train_lora.py compiles the layers' training graph on a stand-in layer while the weights load
    (qcd.warm_compile, inductor, LoRA dropout on): the memory probe's forward and backward, the model's first
    compiled call, then makes no graph of its own; the stand-in draws nothing from the CPU's random generator
    (the LoRA and head initialisation draw from it meanwhile), and the run's losses are bitwise those of a run
    that compiles without it (its GPU dropout draws are re-seeded away)."""
    from torch._dynamo.utils import counters

    state = torch.random.get_rng_state()
    torch._dynamo.reset()
    qcd.warm_compile(qcd.read_config(tiny_ckpt, qcd.VARLEN), torch.bfloat16,
                     {"r": 16, "alpha": 32, "dropout": 0.1, "targets": list(qcd.LORA_TARGETS)}, 8, 64, "cuda",
                     lambda: torch.autocast("cuda", enabled=False))
    assert torch.equal(state, torch.random.get_rng_state()), "the stand-in drew from the CPU generator"
    seen = {}
    probe = train_lora.memory_probe

    def watched_probe(*a, **k):
        before = counters["stats"]["unique_graphs"]
        result = probe(*a, **k)
        seen.setdefault("probe_graphs", counters["stats"]["unique_graphs"] - before)
        return result

    torch._dynamo.reset()
    monkeypatch.setattr(train_lora, "memory_probe", watched_probe)
    same = ("--num_epochs", 1, "--eval_steps", 27, "--compile", "on")
    assert run(tiny_ckpt, demo_data, tmp_path / "ahead", *same) == 0
    assert seen["probe_graphs"] == 0, "the model compiled a graph of its own after the stand-in's"
    torch._dynamo.reset()
    monkeypatch.setattr(train_lora, "warm_compile", lambda args, rt: None)
    assert run(tiny_ckpt, demo_data, tmp_path / "itself", *same) == 0
    assert log(tmp_path / "ahead")[0][:5] == log(tmp_path / "itself")[0][:5]
