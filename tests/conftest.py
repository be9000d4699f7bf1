"""Shared fixtures: the bundled tokenizer, a tiny preprocessed corpus, and a torchrun runner."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLED_TOKENIZER = REPO / "monta" / "data" / "bundled" / "tokenizer.model"
BUNDLED_CORPUS = REPO / "monta" / "data" / "bundled" / "corpus.jsonl.gz"


@pytest.fixture(scope="session")
def tokenizer_model() -> str:
    return str(BUNDLED_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_data_prefix(tmp_path_factory) -> str:
    """The first 400 documents of the bundled corpus, preprocessed like `make data` does."""
    root = tmp_path_factory.mktemp("tiny_data")
    subset = root / "subset.jsonl"
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as src, open(subset, "w") as dst:
        for i, line in enumerate(src):
            if i == 400:
                break
            dst.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(subset),
         "--output-prefix", str(root / "tiny"), "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", str(BUNDLED_TOKENIZER), "--append-eod", "--workers", "1"],
        check=True, cwd=REPO, timeout=120, capture_output=True,
    )
    return str(root / "tiny_text_document")


@dataclass
class RunResult:
    returncode: int
    output: str
    timed_out: bool


def run_command(command: list[str], timeout_s: float, env: dict | None = None,
                cwd: Path = REPO) -> RunResult:
    """Run ``command`` with a hard timeout and one thread per process.

    On timeout the whole process group (torchrun's workers included) is killed and
    ``timed_out`` is set, so a hang is a test failure with the captured output, never a stuck
    suite.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        return RunResult(process.returncode, output, False)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return RunResult(-9, output, True)


def run_torchrun(args: list[str], nproc: int, timeout_s: float, env: dict | None = None,
                 cwd: Path = REPO) -> RunResult:
    """`torchrun --nproc-per-node N pretrain_moe.py ARGS` under :func:`run_command`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), str(REPO / "pretrain_moe.py"), *args]
    return run_command(command, timeout_s, env, cwd)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "128", "--swiglu",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--normalization", "RMSNorm",
    "--num-experts", "8", "--moe-router-topk", "2", "--seq-length", "64",
    "--micro-batch-size", "2", "--lr", "1e-3", "--no-progress-bar",
]
