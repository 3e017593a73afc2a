"""Hostile or broken models and flags (issue 14, items 4-7, 9, 12): damaged bases, NaN weights, tampered adapters,
resuming on another base, implausible flags. Each is refused with one line (exit 2) before any work, or caught
where it happens; nothing silently computes on wrong weights.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import test_saved_lora
import train_lora
from lft.common import run_cli
from test_train import base_args

QUICK = ("--num_epochs", "1", "--batch_size", "32", "--eval_steps", "7", "--logging_steps", "7")


def copy_ckpt(src, dst, edit=None):
    """A copy of the base folder (files hard-linked) whose model.safetensors `edit(state)` may change."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors" or edit is None:
            os.link(f, dst / f.name)
    if edit is not None:
        state = load_file(str(src / "model.safetensors"))
        edit(state)
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def one_error_line(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def trained(tiny_ckpt, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert train_lora.main(base_args(tiny_ckpt, demo_data, out, *QUICK, "--save_total_limit", "5")) == 0
    return out


def evaluate(ckpt, adapter_dir, demo_data, out):
    return run_cli(test_saved_lora.main, ["--checkpoint", str(ckpt), "--lora_model", str(adapter_dir),
                                          "--test_data", str(demo_data["test"]), "--output_dir", str(out)])


# --- the base model ------------------------------------------------------------------------------------------

def _rerandomise_one_layer(state):
    g = torch.Generator().manual_seed(5)
    w = state["model.layers.1.mlp.down_proj.weight"]
    state["model.layers.1.mlp.down_proj.weight"] = torch.randn(w.shape, generator=g) * w.std()


def _nan_everywhere(state):
    for k in state:
        state[k] = torch.full_like(state[k], float("nan"))


def _drop_a_layer_tensor(state):
    del state["model.layers.1.self_attn.q_proj.weight"]


@pytest.mark.parametrize("edit, message", [
    (_rerandomise_one_layer, "whose weights differ from --checkpoint"),
    (_nan_everywhere, "holds NaN or inf values"),
    (_drop_a_layer_tensor, "not in the weights, e.g. layers.1.self_attn.q_proj.weight"),
])
def test_a_damaged_base_is_refused_for_an_adapter(edit, message, tiny_ckpt, trained, demo_data, tmp_path, capsys):
    bad = copy_ckpt(tiny_ckpt, tmp_path / "bad", edit)
    err = one_error_line(capsys, evaluate(bad, trained / "best_model", demo_data, tmp_path / "ev"))
    assert message in err
    assert not (tmp_path / "ev").exists()


def test_nan_base_and_extra_layers_in_config_refused_before_training(tiny_ckpt, demo_data, tmp_path, capsys):
    nan = copy_ckpt(tiny_ckpt, tmp_path / "nan", _nan_everywhere)
    rc = run_cli(train_lora.main, base_args(nan, demo_data, tmp_path / "o1", *QUICK))
    assert "holds NaN or inf values" in one_error_line(capsys, rc)
    more = copy_ckpt(tiny_ckpt, tmp_path / "more")
    config = json.loads((more / "config.json").read_text())
    config["num_hidden_layers"], config["layer_types"] = 3, ["full_attention"] * 3
    (more / "config.json").unlink()
    (more / "config.json").write_text(json.dumps(config))
    rc = run_cli(train_lora.main, base_args(more, demo_data, tmp_path / "o2", *QUICK))
    assert "not in the weights, e.g. layers.2." in one_error_line(capsys, rc)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", "config.json is not valid JSON"),
    ("[1, 2]", "config.json holds a list, not an object"),
])
def test_broken_config_json_is_one_line(content, message, tiny_ckpt, demo_data, tmp_path, capsys):
    bad = copy_ckpt(tiny_ckpt, tmp_path / "bad")
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(content)
    assert message in one_error_line(capsys, run_cli(train_lora.main, base_args(bad, demo_data, tmp_path / "o")))


def test_broken_index_and_tokenizer_are_one_line(tiny_ckpt, demo_data, tmp_path, capsys):
    bad = copy_ckpt(tiny_ckpt, tmp_path / "idx")
    (bad / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    rc = run_cli(train_lora.main, base_args(bad, demo_data, tmp_path / "o"))
    assert "no valid weight_map" in one_error_line(capsys, rc)
    bad = copy_ckpt(tiny_ckpt, tmp_path / "tok")
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer.json").write_text('{"model": ')
    rc = run_cli(train_lora.main, base_args(bad, demo_data, tmp_path / "o"))
    assert "tokenizer.json is not valid JSON" in one_error_line(capsys, rc)


def _rewrite_header(folder, edit):
    """model.safetensors with its header changed by `edit(header)` and the same bytes after it (padded to 8)."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.unlink()  # a hard link to the shared checkpoint: write a file of its own
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _shape_without_bytes(header):
    header["model.layers.0.mlp.up_proj.weight"]["shape"] = [128, 32]  # half the elements its byte range holds


def _overlap(header):
    header["model.layers.0.self_attn.k_proj.weight"]["data_offsets"] = \
        header["model.layers.0.self_attn.v_proj.weight"]["data_offsets"]  # same size: two names, one byte range


def _negative_range(header):
    start, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [end, start]


@pytest.mark.parametrize("edit, message", [
    (_shape_without_bytes, "the header's entry for model.layers.0.mlp.up_proj.weight does not describe its bytes"),
    (_overlap, "the header describes overlapping tensors"),
    (_negative_range, "the header's entry for model.norm.weight does not describe its bytes"),
])
def test_a_weights_header_that_does_not_describe_its_bytes_is_one_line(edit, message, tiny_ckpt, demo_data, tmp_path,
                                                                       capsys):
    """The weights are read by the byte ranges the header gives (straight to the GPU: read_to_gpu), so check_folder
    holds every range to its dtype and shape, and no two to the same bytes, before anything loads."""
    bad = copy_ckpt(tiny_ckpt, tmp_path / "bad")
    _rewrite_header(bad, edit)
    rc = run_cli(train_lora.main, base_args(bad, demo_data, tmp_path / "o"))
    assert message in one_error_line(capsys, rc)
    assert not (tmp_path / "o").exists()


def test_resume_on_another_base_is_refused_before_any_step(tiny_ckpt, trained, demo_data, tmp_path, capsys):
    other = copy_ckpt(tiny_ckpt, tmp_path / "other", _rerandomise_one_layer)
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(trained / "checkpoint-7", out / "checkpoint-7")
    rc = run_cli(train_lora.main, base_args(other, demo_data, out, *QUICK, "--num_epochs", "2",
                                            "--resume_from_checkpoint", "auto"))
    assert "checkpoint-7: trained on base" in one_error_line(capsys, rc)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-7"]  # nothing trained, nothing written


# --- non-finite models and implausible flags ---------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (("--learning_rate", "inf"), "--learning_rate inf must be in (0, 1]"),
    (("--learning_rate", "5e5"), "--learning_rate 500000.0 must be in (0, 1]"),
    (("--weight_decay", "-0.1"), "--weight_decay must be in [0, 1)"),
    (("--max_grad_norm", "-1"), "--max_grad_norm must be >= 0"),
    (("--seed", "100000000000000000000"), "--seed must be in [0, 2^31)"),
    (("--lora_target_modules", ","), "--lora_target_modules names no module"),
])
def test_implausible_flags_are_errors(flags, message, tiny_ckpt, demo_data, tmp_path, capsys):
    rc = run_cli(train_lora.main, base_args(tiny_ckpt, demo_data, tmp_path / "o", *flags))
    assert message in one_error_line(capsys, rc)
    assert not (tmp_path / "o").exists()


def test_unknown_lora_target_is_one_line(tiny_ckpt, demo_data, tmp_path, capsys):
    rc = run_cli(train_lora.main, base_args(tiny_ckpt, demo_data, tmp_path / "o", "--lora_target_modules", "foo"))
    assert "--lora_target_modules: foo is not a module of the model" in one_error_line(capsys, rc)


def test_a_nan_adapter_is_never_saved(tiny_ckpt, demo_data, tmp_path, capsys, monkeypatch):
    import qwen3_classification_direct as qcd

    real = qcd.Qwen3Classifier.forward

    def forward(self, *a, **k):  # every training forward is NaN from the start; evaluation is not
        out = real(self, *a, **k)
        return out * float("nan") if self.training else out

    monkeypatch.setattr(qcd.Qwen3Classifier, "forward", forward)
    # with the optimizer skipping non-finite steps the weights stay finite; force them NaN through the head
    rc = run_cli(train_lora.main, base_args(tiny_ckpt, demo_data, tmp_path / "o", *QUICK, "--max_nonfinite_steps",
                                            "2"))
    assert "consecutive steps with a non-finite loss" in one_error_line(capsys, rc)
    assert not (tmp_path / "o" / "best_model").exists()


def test_save_adapter_refuses_non_finite_weights(trained, tiny_ckpt, tmp_path):
    from lft import adapter
    from lft.common import UserError

    model, _, meta = adapter.load_classifier(tiny_ckpt, trained / "best_model")
    with torch.no_grad():
        model.score.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="non-finite values in score.weight"):
        adapter.save_adapter(model, tmp_path / "nan_adapter", meta)
    assert not (tmp_path / "nan_adapter").exists()


# --- tampered adapters -------------------------------------------------------------------------------------

def _no_tensors(folder):
    save_file({}, str(folder / "adapter_model.safetensors"))


def _zeroed_shape(folder):
    state = load_file(str(folder / "adapter_model.safetensors"))
    k = sorted(state)[0]
    state[k] = torch.zeros(0)
    save_file(state, str(folder / "adapter_model.safetensors"))


def _one_missing(folder):
    state = load_file(str(folder / "adapter_model.safetensors"))
    del state[sorted(state)[-1]]
    save_file(state, str(folder / "adapter_model.safetensors"))


def _edited_alpha(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 64
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _truncated_head(folder):
    data = (folder / "head.safetensors").read_bytes()
    (folder / "head.safetensors").write_bytes(data[:-7])


def _nan_head(folder):
    save_file({"score.weight": torch.full((6, 64), float("nan"))}, str(folder / "head.safetensors"))


def _garbage_config(folder):
    (folder / "classifier_config.json").write_text("{broken")


@pytest.mark.parametrize("tamper, message", [
    (_no_tensors, "missing"), (_zeroed_shape, "has shape (0,)"), (_one_missing, "missing 1 tensor(s)"),
    (_edited_alpha, "lora_alpha 64 (trained with 32)"), (_truncated_head, "head.safetensors"),
    (_nan_head, "non-finite values in score.weight"), (_garbage_config, "not valid JSON"),
])
def test_tampered_adapters_are_refused(tamper, message, trained, tiny_ckpt, demo_data, tmp_path, capsys):
    folder = tmp_path / "adapter"
    shutil.copytree(trained / "best_model", folder)
    tamper(folder)
    err = one_error_line(capsys, evaluate(tiny_ckpt, folder, demo_data, tmp_path / "ev"))
    assert message in err
    assert not (tmp_path / "ev").exists()


# --- output folders ----------------------------------------------------------------------------------------

def test_dangling_symlink_output_dir_is_named(tiny_ckpt, demo_data, tmp_path, capsys):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    rc = run_cli(train_lora.main, base_args(tiny_ckpt, demo_data, link, *QUICK))
    err = one_error_line(capsys, rc)
    assert "symbolic link" in err and "free space" not in err


def test_evaluation_defaults_to_a_folder_beside_the_adapter(trained, tiny_ckpt, demo_data, tmp_path):
    folder = tmp_path / "best_model"
    shutil.copytree(trained / "best_model", folder)
    assert test_saved_lora.main(["--checkpoint", str(tiny_ckpt), "--lora_model", str(folder), "--test_data",
                                 str(demo_data["test"]), "--no_progress"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", "head.safetensors", "classifier_config.json"])
    assert (tmp_path / "best_model_eval" / "test_results.json").is_file()


def test_a_reused_output_folder_loses_its_stale_test_results(trained, tiny_ckpt, demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    assert not (out / "test_results.json").exists()
    (out / "test_results.json").write_text('{"accuracy": 1.0}')  # what an earlier run with --test_data left
    assert train_lora.main(base_args(tiny_ckpt, demo_data, out, *QUICK, "--num_epochs", "2", "--save_total_limit",
                                     "5", "--resume_from_checkpoint", "auto")) == 0
    assert "removed test_results.json of an earlier run" in capsys.readouterr().out
    assert not (out / "test_results.json").exists()


def test_resuming_into_a_new_output_dir_brings_its_best_model(trained, tiny_ckpt, demo_data, tmp_path, capsys):
    new = tmp_path / "new"
    assert train_lora.main(base_args(tiny_ckpt, demo_data, new, *QUICK, "--resume_from_checkpoint",
                                     str(trained / "checkpoint-7"), "--test_data", demo_data["test"])) == 0
    assert (new / "best_model").is_dir() and (new / "test_results.json").is_file()
    assert "note: copied" in capsys.readouterr().out


def test_a_signal_after_training_says_what_is_done(capsys):
    import signal

    from lft.signals import announce_signals

    with pytest.raises(SystemExit) as e, announce_signals("best_model is complete"):
        os.kill(os.getpid(), signal.SIGTERM)
    assert e.value.code == 143 and "SIGTERM received: best_model is complete" in capsys.readouterr().err


def test_ddp_micro_batches_left_out_are_said(tiny_ckpt, demo_data, tmp_path):
    """216 texts in micro-batches of 7: 31 micro-batches, steps of 2 (one per process): the 31st is left out of
    every epoch, and the banner says so."""
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train_lora.py"), *base_args(tiny_ckpt, demo_data, tmp_path / "ddp", "--num_epochs", "1",
                                                   "--batch_size", "7", "--gradient_accumulation_steps", "1",
                                                   "--eval_steps", "100")]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: 1 micro-batch(es) of up to 7 texts per epoch are left out" in r.stdout
