"""Untrusted files cannot run code, secrets never reach an output, paths from data or checkpoints never write.

Every "malicious" file here would create a marker file if it ever ran; each test asserts the marker is absent.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import test_saved_lora
import train_lora
from conftest import REPO, subprocess_env
from lft import checkpoint as C
from lft.common import UserError, redact, run_cli
from lft.data import DEFAULT_LABELS
from test_train import base_args


class Exploit:
    """Unpickling this calls open(marker, "w"): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _ckpt_without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def test_pickle_model_files_are_refused_unread(tiny_ckpt, demo_data, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _ckpt_without_weights(tiny_ckpt, tmp_path / "pickled")
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(UserError, match=r"no \*.safetensors weights \(found pickle files pytorch_model.bin; only "
                                        r"safetensors are loaded\)"):
        train_lora.main(base_args(ckpt, demo_data, tmp_path / "run"))
    # an adapter folder holding a pickle instead of safetensors
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Exploit(marker)))
    (adapter / "classifier_config.json").write_text(json.dumps(
        {"format": "lft-qwen3-classifier/1", "labels": list(DEFAULT_LABELS), "pooling": "last", "max_length": 8}))
    with pytest.raises(UserError, match="incomplete adapter, missing adapter_model.safetensors"):
        test_saved_lora.main(["--checkpoint", str(tiny_ckpt), "--lora_model", str(adapter), "--test_data",
                              str(demo_data["test"]), "--device", "cpu"])
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_remote_code_in_a_checkpoint_never_runs(tiny_ckpt, demo_data, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _ckpt_without_weights(tiny_ckpt, tmp_path / "remote")
    os.symlink(tiny_ckpt / "model.safetensors", ckpt / "model.safetensors")
    evil = f"open({str(marker)!r}, 'w')\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (ckpt / name).write_text(evil)
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert train_lora.main(base_args(ckpt, demo_data, tmp_path / "run", "--num_epochs", "1", "--batch_size", "32")) == 0
    assert not marker.exists()


def _reseal(folder: Path) -> None:
    """Rewrite trainer_state.json's sizes and hashes, as an attacker who edits a checkpoint would."""
    info = json.loads((folder / "trainer_state.json").read_text())
    info["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": C._sha256(p)}
                     for p in sorted(folder.iterdir()) if p.is_file() and p.name != "trainer_state.json"}
    (folder / "trainer_state.json").write_text(json.dumps(info))


@pytest.fixture(scope="module")
def one_checkpoint(tiny_ckpt, demo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "run"
    assert train_lora.main(base_args(tiny_ckpt, demo_data, out, "--num_epochs", "1", "--batch_size", "32",
                                     "--eval_steps", "7")) == 0
    return out / "checkpoint-7"


def test_crafted_checkpoints_are_refused(one_checkpoint, tiny_ckpt, demo_data, tmp_path):
    marker = tmp_path / "pwned"
    argv = base_args(tiny_ckpt, demo_data, tmp_path / "run", "--num_epochs", "1", "--batch_size", "32")
    # 1: trainer_state.pt that would run code when unpickled, with a matching seal
    evil = tmp_path / "evil" / "checkpoint-7"
    shutil.copytree(one_checkpoint, evil)
    torch.save({"global_step": 1}, evil / "trainer_state.pt")  # a valid zip, then swap in the pickle
    with zipfile.ZipFile(evil / "trainer_state.pt") as z:
        names = z.namelist()
        members = {n: z.read(n) for n in names}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps(Exploit(marker), protocol=2)
    with zipfile.ZipFile(evil / "trainer_state.pt", "w", zipfile.ZIP_STORED) as z:
        for n in names:
            z.writestr(n, members[n])
    _reseal(evil)
    with pytest.raises(UserError, match="trainer_state.pt: refused to load .*not written by this toolkit"):
        train_lora.main(argv + ["--resume_from_checkpoint", str(evil)])
    assert not marker.exists()
    # 2: a step number that is a path: checkpoint-<step> must never be built from it
    escape = tmp_path / "escape" / "checkpoint-7"
    shutil.copytree(one_checkpoint, escape)
    state = torch.load(escape / "trainer_state.pt", weights_only=True)
    state["global_step"] = "../../../outside"
    torch.save(state, escape / "trainer_state.pt")
    _reseal(escape)
    with pytest.raises(UserError, match=r"bad training state \{'global_step': '../../../outside'"):
        train_lora.main(argv + ["--resume_from_checkpoint", str(escape)])
    assert not (tmp_path / "outside").exists()
    # 3: a seal naming a file outside the folder
    listed = tmp_path / "listed" / "checkpoint-7"
    shutil.copytree(one_checkpoint, listed)
    info = json.loads((listed / "trainer_state.json").read_text())
    info["files"]["../../secret.txt"] = {"bytes": 1, "sha256": "0"}
    (listed / "trainer_state.json").write_text(json.dumps(info))
    assert C.verify_checkpoint(listed) == "trainer_state.json lists a bad file name '../../secret.txt'"


def test_label_names_that_look_like_paths_write_nothing_outside(tiny_ckpt, demo_data, tmp_path):
    import pandas as pd

    names = {"正常": "../../escape", "歧视": "/tmp/lft-escape"}
    data = {}
    for split, path in demo_data.items():
        df = pd.read_excel(path)
        df = df[df["extracted_label"].isin(names)].replace({"extracted_label": names})
        data[split] = tmp_path / f"{split}.csv"
        df.to_csv(data[split], index=False)
    before = set(tmp_path.parent.rglob("*"))
    out = tmp_path / "run"
    assert train_lora.main(base_args(tiny_ckpt, data, out, "--labels", ",".join(names.values()), "--num_epochs",
                                     "1", "--batch_size", "16", "--test_data", data["test"])) == 0
    assert test_saved_lora.main(["--checkpoint", str(tiny_ckpt), "--lora_model", str(out / "best_model"),
                                 "--test_data", str(data["test"]), "--device", "cpu", "--predictions_format",
                                 "csv"]) == 0
    new = set(tmp_path.parent.rglob("*")) - before
    assert new and all(out in p.parents or p == out for p in new), sorted(map(str, new - {out}))[:5]
    assert not Path("/tmp/lft-escape").exists()


# --- secrets ----------------------------------------------------------------------------------------------

SECRET = "S3cr3tPw-71f"
URI = f"mongodb://admin:{SECRET}@db.internal:27017/corp"


def _all_text(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, zips (xlsx, torch files) opened member by member."""
    found = {}
    for p in folder.rglob("*"):
        if p.is_file():
            found[str(p)] = p.read_bytes()
            if zipfile.is_zipfile(p):
                with zipfile.ZipFile(p) as z:
                    for n in z.namelist():
                        found[f"{p}!{n}"] = z.read(n)
    return found


def test_secrets_never_reach_logs_outputs_or_checkpoints(tiny_ckpt, demo_data, tmp_path, monkeypatch, capsys):
    # a credential-bearing URI given as a data path: the folders exist, so the run is real
    # (Path folds "mongodb://" into "mongodb:/", which is how the scripts see it)
    where = tmp_path / "mnt" / "mongodb:" / f"admin:{SECRET}@db.internal:27017" / "corp"
    where.mkdir(parents=True)
    data = {}
    for split, path in demo_data.items():
        shutil.copy(path, where / path.name)
        data[split] = f"{tmp_path / 'mnt'}/{URI}/{path.name}"
    monkeypatch.setenv("MONGO_URI", URI)
    monkeypatch.setenv("DB_PASSWORD", SECRET)
    out, ev = tmp_path / "run", tmp_path / "eval"
    r = subprocess.run([sys.executable, str(REPO / "train_lora.py"),
                        *base_args(tiny_ckpt, data, out, "--num_epochs", "1", "--batch_size", "32", "--eval_steps",
                                   "7", "--test_data", data["test"], "--save_steps", "3")],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    console = r.stdout + r.stderr
    assert test_saved_lora.main(["--checkpoint", str(tiny_ckpt), "--lora_model", str(out / "best_model"),
                                 "--test_data", data["test"], "--output_dir", str(ev), "--device", "cpu"]) == 0
    # failures echo arguments: a missing file, an unknown flag, a bad choice
    for bad in (["--train_data", URI + "/nope.xlsx"], ["--mongo_uri", URI], ["--device", URI]):
        try:
            rc = run_cli(train_lora.main, base_args(tiny_ckpt, demo_data, tmp_path / "bad") + bad)
        except SystemExit as e:  # argparse
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and "admin:***@db.internal" in err, err
        console += err
    console += capsys.readouterr().out
    assert "admin:***@db.internal" in console and SECRET not in console
    files = {**_all_text(out), **_all_text(ev)}
    assert len(files) > 20
    assert [name for name, data in files.items() if SECRET.encode() in data] == []
    assert "admin:***@db.internal" in (out / "args.json").read_text()  # the value was there, redacted


def test_redact():
    assert redact(URI) == "mongodb://admin:***@db.internal:27017/corp"
    assert redact(f"/data/mongodb:/admin:{SECRET}@host/x.xlsx") == "/data/mongodb:/admin:***@host/x.xlsx"
    assert redact(f"host=db;password={SECRET};user=a") == "host=db;password=***;user=a"
    assert redact("mongodb://db.internal/corp and C:/data") == "mongodb://db.internal/corp and C:/data"


@pytest.mark.parametrize("text, expected", [
    # URI userinfo: the password is everything up to the last "@" before the host
    ("mongodb://u:pa/ss@h/db", "mongodb://u:***@h/db"),
    ("mongodb://u:p@ss:w@h:27017/x", "mongodb://u:***@h:27017/x"),
    ("mongodb+srv://u:p%40ss@cluster.example/?tls=true", "mongodb+srv://u:***@cluster.example/?tls=true"),
    ("uri 'mongodb://user@corp:pw@h' failed", "uri 'mongodb://user@corp:***@h' failed"),
    ("https://x:tok/en@github.com/a.git", "https://x:***@github.com/a.git"),
    # any key ending in password/passwd/pwd/secret/token/api_key/apikey, any case, k=v / k: v / JSON / repr
    ("MONGO_PASSWORD=s3/cr3t python x.py", "MONGO_PASSWORD=*** python x.py"),
    ("db_pwd=abc user=x", "db_pwd=*** user=x"),
    ("admin_passwd=abc", "admin_passwd=***"),
    ("?tls=true&tlsCertificateKeyFilePassword=k3y&x=1", "?tls=true&tlsCertificateKeyFilePassword=***&x=1"),
    ("GITHUB_TOKEN: ghp_abc next", "GITHUB_TOKEN: *** next"),
    ("client_secret = 'a b'", "client_secret = '***'"),
    ('{"api_key": "z\\"z", "n": 1}', '{"api_key": "***", "n": 1}'),
    ("{'x-api-key': 'k', 'APIKEY': 5}", "{'x-api-key': '***', 'APIKEY': ***"),  # unquoted: to the next space,
    ("Namespace(password='pw', auth_token=None)", "Namespace(password='***', auth_token=***"),  # "&" or ";"
    ("db_pwd=a,b)c&x=1", "db_pwd=***&x=1"),
    # not secrets: keys that only contain the words, values already hidden, plain prose
    ("max_tokens=5 passwords: 3 tokenizer=qwen", "max_tokens=5 passwords: 3 tokenizer=qwen"),
    ("mongodb://user@host:27017/db", "mongodb://user@host:27017/db"),
    ("password=***", "password=***"),
])
def test_redact_table(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected
