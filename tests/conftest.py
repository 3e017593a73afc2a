"""Shared fixtures: one tiny Qwen3 checkpoint (real tokenizer) and the demo data, built once per session.

Two threads are ~10x slower than one on the 2-core CI machines, so every test process uses one.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a hub

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lft.demo import build_tiny_qwen3, write_demo_data  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("ckpt") / "qwen3-tiny")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    return write_demo_data(tmp_path_factory.mktemp("data"))


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return env


def one_line_error(fn, *args) -> str:
    """The message of the UserError `fn(*args)` raises, checked to be one line (what the scripts print)."""
    from lft.common import UserError

    with pytest.raises(UserError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one; run on the GPU machine)")
