"""load_model.py shows an adapter's training arguments as a two-column table, long values wrapped then cut."""
import torch

import load_model
import qwen3_classification_direct as qcd
from lft.data import DEFAULT_LABELS


def test_args_table_columns_wrap_and_cut():
    rows = load_model.args_table({"lr": 5e-05, "bf16": True, "labels": None, "output_dir": "o" * 10,
                                  "lora_target_modules": "q_proj,k_proj", "train_data": "x" * 25},
                                 width=10, max_lines=2)
    assert rows == ["  lr                   5e-05",
                    "  bf16                 true",
                    "  labels               null",
                    "  output_dir           oooooooooo",
                    "  lora_target_modules  q_proj,k_p",
                    "                       roj",
                    "  train_data           xxxxxxxxxx",
                    "                       xxxxxxx..."]
    # CJK characters take two columns: 5 of them fill a width of 10
    assert load_model.args_table({"labels": "暴恐,色情,政治安全,"}, width=10) == ["  labels  暴恐,色情,", "          政治安全,"]
    assert load_model.args_table({}) == ["  (none recorded)"]


def test_main_prints_the_table(tiny_ckpt, tmp_path, capsys):
    torch.manual_seed(0)
    model, identity = qcd.build_classifier(tiny_ckpt, DEFAULT_LABELS, dropout=0.0, lora=dict(r=4, alpha=8,
                                                                                             dropout=0.0))
    args = {"learning_rate": 5e-05, "labels": None, "lora_r": 4, "output_dir": "/runs/" + "a" * 100}
    meta = {"labels": list(DEFAULT_LABELS), "max_length": 64, "args": args, "metrics": None, "base": identity}
    from lft import adapter

    adapter.save_adapter(model, tmp_path / "adapter", meta)
    assert load_model.main(["--checkpoint", str(tiny_ckpt), "--lora_model", str(tmp_path / "adapter"),
                            "--dtype", "float32"]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("training arguments")
    assert out[i + 1:] == ["  learning_rate  5e-05",
                           "  labels         null",
                           "  lora_r         4",
                           "  output_dir     /runs/" + "a" * 66,
                           "                 " + "a" * 34]
