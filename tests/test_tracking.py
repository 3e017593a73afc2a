"""Experiment tracking: what each backend wrote is read back with that backend's own reader (no mocks), and a
missing package or an unknown name is one line."""
import argparse
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from lft.common import UserError
from lft.tracking import (Tracker, add_tracking_args, check_tracking_args, flatten_scalars, missing_package,
                          mlflow_name, parse_report_to)

PARAMS = {"learning_rate": 5e-05, "labels": None, "lora_r": 8, "bf16": True, "output_dir": "/x/lora_model"}
VAL = {"accuracy": 0.75, "macro_f1": 0.5, "labels": ["暴恐", "色情"], "confusion_matrix": [[1, 0], [0, 1]],
       "per_class": {"暴恐": {"f1": 0.25, "support": 3}, "色情": {"f1": 0.75, "support": 1}}}
WANT = {"train/loss": [(10, 1.25), (20, 1.0)], "val/macro_f1": [(20, 0.5)], "val/per_class/暴恐/f1": [(20, 0.25)]}


def write_run(report_to, out, run_name="r1", resume_step=None, steps=(10, 20)):
    with Tracker.open(report_to, out, run_name, PARAMS, is_main=True, resume_step=resume_step) as t:
        assert t.names == parse_report_to(report_to)
        for step in steps:
            t.log(step, {"train/loss": 1.25 if step == 10 else 1.0})
        if 20 in steps:
            t.log(20, {"val": VAL})


def test_flatten():
    assert flatten_scalars({"loss": 1, "flag": True, "val": VAL, "x": np.float32(0.5), "t": "s"}) == {
        "loss": 1.0, "val/accuracy": 0.75, "val/macro_f1": 0.5, "val/per_class/暴恐/f1": 0.25,
        "val/per_class/暴恐/support": 3.0, "val/per_class/色情/f1": 0.75, "val/per_class/色情/support": 1.0,
        "x": 0.5}


def test_names_mlflow_refuses_are_made_safe():
    assert mlflow_name("val/per_class/暴恐/f1") == "val/per_class/暴恐/f1"  # \w covers CJK
    assert mlflow_name("val/per_class/a+b (x):1/f1") == "val/per_class/a_b _x_:1/f1"
    assert mlflow_name("a//../b/") == "a/_/_/b/_"
    long = mlflow_name("x" * 300)
    assert len(long) == 250 and long != mlflow_name("x" * 301)


def test_report_to_parsing_and_problems():
    assert parse_report_to("none") == [] and parse_report_to("") == [] and parse_report_to(None) == []
    assert parse_report_to(" TensorBoard,mlflow,tensorboard ") == ["tensorboard", "mlflow"]
    p = argparse.ArgumentParser()
    add_tracking_args(p)
    args = p.parse_args([])
    assert (args.report_to, args.run_name) == ("none", None)
    problems = []
    check_tracking_args(p.parse_args(["--report_to", "tensorbord,mlflow"]), problems)
    assert problems == ["--report_to 'tensorbord': choose none or a comma list of tensorboard, mlflow, trackio, "
                        "wandb"]
    problems = []
    check_tracking_args(p.parse_args(["--report_to", "none,wandb", "--run_name", " "]), problems)
    assert problems == ["--report_to 'none' with a tracker: choose none or a comma list of tensorboard, mlflow, "
                        "trackio, wandb", "--run_name must not be empty"]
    with pytest.raises(UserError, match="--report_to 'x'"):
        Tracker.open("x", "/nonexistent", None, {}, is_main=True)


def test_missing_package_is_one_line_with_the_pip_command(monkeypatch, tmp_path):
    # as if wandb and alembic were not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name in ("wandb", "alembic") else 1)
    assert missing_package("wandb") == "--report_to wandb needs the package 'wandb': pip install wandb==0.31.0"
    assert missing_package("mlflow") == ("--report_to mlflow needs the package 'alembic': pip install "
                                         "mlflow-skinny==3.17.2 sqlalchemy==2.1.9 alembic==1.20.1")
    with pytest.raises(UserError, match=r"^--report_to wandb needs the package 'wandb': pip install wandb==0\.31\.0$"):
        Tracker.open("tensorboard,wandb", tmp_path, None, {}, is_main=True)
    assert list(tmp_path.iterdir()) == []  # checked before anything was opened


def test_not_main_or_none_writes_nothing(tmp_path):
    for report_to, is_main in (("tensorboard,mlflow,wandb,trackio", False), ("none", True)):
        with Tracker.open(report_to, tmp_path, "r", PARAMS, is_main=is_main) as t:
            t.log(1, {"loss": 1.0})
            assert t.names == []
    assert list(tmp_path.iterdir()) == []


# --- tensorboard: torch's SummaryWriter; read back with tensorboard's EventAccumulator ---------------------

def tb_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def test_tensorboard(tmp_path):
    write_run("tensorboard", tmp_path / "lora_model", run_name=None)  # run name: the output folder's
    folder = tmp_path / "lora_model" / "runs" / "lora_model"
    got = tb_scalars(folder)
    assert {k: got[k] for k in WANT} == WANT
    assert set(got) == set(WANT) | {"val/accuracy", "val/per_class/暴恐/support", "val/per_class/色情/f1",
                                    "val/per_class/色情/support"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder))
    ea.Reload()
    text = ea.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| learning_rate | 5e-05 |" in text and "| labels | None |" in text


def test_tensorboard_resume_hides_the_redone_steps(tmp_path):
    write_run("tensorboard", tmp_path, steps=(10, 20, 30))  # interrupted after logging step 30
    with Tracker.open("tensorboard", tmp_path, "r1", PARAMS, is_main=True, resume_step=10) as t:  # resumed at 10
        t.log(20, {"train/loss": 0.5})
    assert tb_scalars(tmp_path / "runs" / "r1")["train/loss"] == [(10, 1.25), (20, 0.5)]


# --- mlflow: local SQLite store; read back with MlflowClient --------------------------------------------

def test_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    write_run("mlflow", tmp_path, run_name="r1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("LLM_Fine_Tuning")
    (run,) = client.search_runs([exp.experiment_id])
    assert (run.info.run_name, run.info.status) == ("r1", "FINISHED")
    assert run.data.params == {"learning_rate": "5e-05", "labels": "None", "lora_r": "8", "bf16": "True",
                               "output_dir": "/x/lora_model"}
    for name, want in WANT.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)] == want
    # a resumed run continues the same MLflow run
    write_run("mlflow", tmp_path, run_name="r1", resume_step=10, steps=(20,))
    (again,) = client.search_runs([exp.experiment_id])
    assert again.info.run_id == run.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [10, 20, 20]


# --- wandb: offline; the .wandb transaction log read back with wandb's own protobuf Record -----------------

def read_wandb_records(path: Path):
    """wandb's .wandb file: a 7-byte header (':W&B', magic 0xBEE1, version) then LevelDB-log framing (32 KiB
    blocks; records of crc32c(4) length(2, little-endian) type(1) data, split FIRST/MIDDLE/LAST across
    blocks). wandb's Python reader was removed when the Go core took over, so the framing is parsed here;
    the records are decoded with wandb's own protobuf classes."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B" and data[4:6] == b"\xe1\xbe"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            r = Record()
            r.ParseFromString(parts)
            yield r
            parts = b""


def test_wandb_offline(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ERROR_REPORTING"):
        monkeypatch.delenv(var, raising=False)
    write_run("wandb", tmp_path, run_name="r1")
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, run = {}, {}, None
    for r in read_wandb_records(log):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    history.setdefault(k, []).append((items["_step"], v))
        elif kind in ("run", "config"):  # the config comes with the run record (and any later update)
            update = r.run.config.update if kind == "run" else r.config.update
            config.update({i.key: json.loads(i.value_json) for i in update if not i.key.startswith("_")})
            run = r.run if kind == "run" else run
    assert (run.display_name, run.project) == ("r1", "LLM_Fine_Tuning")
    assert {k: history[k] for k in WANT} == WANT
    assert config == PARAMS
    # a resumed run continues the same wandb run (same id); a fresh one gets a new id
    first_id = log.parent.name.rsplit("-", 1)[1]
    write_run("wandb", tmp_path, run_name="r1", resume_step=10, steps=(20,))
    assert {p.name.rsplit("-", 1)[1] for p in (tmp_path / "wandb").glob("offline-run-*")} == {first_id}
    (latest,) = (tmp_path / "wandb" / "latest-run").resolve().glob("run-*.wandb")
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in read_wandb_records(latest)
            if r.WhichOneof("record_type") == "history"]
    assert [(row["_step"], row["train/loss"]) for row in rows if "train/loss" in row] == [(20, 1.0)]


# --- trackio: in a fresh process (it fixes its storage folder when first imported) --------------------------

TRACKIO_CHILD = """
import json, sys
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from pathlib import Path
import test_tracking as T
T.write_run("trackio", Path(sys.argv[1]), run_name="r1")
from trackio.sqlite_storage import SQLiteStorage
got = {}
for row in SQLiteStorage.get_logs("LLM_Fine_Tuning", "r1"):
    for k, v in row.items():
        if k not in ("step", "timestamp"):
            got.setdefault(k, []).append([row["step"], v])
print(json.dumps(got))
"""


def test_trackio(tmp_path):
    import subprocess

    from conftest import REPO, subprocess_env

    env = {k: v for k, v in subprocess_env().items() if k != "TRACKIO_DIR"}
    r = subprocess.run([sys.executable, "-c", TRACKIO_CHILD, str(tmp_path), str(REPO), str(REPO / "tests")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "trackio" / "LLM_Fine_Tuning.db").is_file()
    got = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))  # trackio prints too
    assert {k: [tuple(x) for x in got[k]] for k in WANT} == WANT
