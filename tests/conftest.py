"""Shared fixtures. Real models and data come from SECATEUR_SHARED_DIR (default: ../shared beside
the checkout); tests that need them are skipped with a clear reason when it is absent."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SECATEUR_PROGRESS", "0")
# a registry the tests may write to, never the user's own (~/.local/share/secateur)
os.environ["SECATEUR_HOME"] = tempfile.mkdtemp(prefix="secateur-test-home-")

# the resource planner prices stages with fixed round prices in tests (measuring this machine's cost
# model takes about a minute; tests/planner measures its parts on their own)
_COSTS = Path(os.environ["SECATEUR_HOME"]) / "test-cost-model.json"
_COSTS.write_text(json.dumps({
    "threads": 2, "gemm": [[r, w, 50.0 if w < 128 else 150.0] for r in (64, 4096) for w in (32, 1536)],
    "attention_score_s": 8e-10, "op_s": 2e-6, "elementwise_bps": 2e10, "sort_eps": 3e7, "read_bps": 1e9,
    "write_bps": 4e8, "hash_bps": 1e9, "base_rss": {"causal": 4e8, "encoder": 4e8}, "load_rss_per_byte": 1.5,
    "memory": {"calibrated": 1.0, "training": 1.5}, "methods": {}, "measured_at": ""}))
os.environ["SECATEUR_COST_MODEL"] = str(_COSTS)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SECATEUR_SHARED_DIR", REPO.parent / "shared"))
if (SHARED / "data").is_dir():
    os.environ.setdefault("SECATEUR_DATA_DIR", str(SHARED / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real models/data not found at {path} (set SECATEUR_SHARED_DIR to the shared folder)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def data_dir(shared_dir: Path) -> Path:
    return _need(shared_dir / "data")


@pytest.fixture(scope="session")
def stories_dir(shared_dir: Path) -> Path:
    return _need(shared_dir / "models" / "stories260K" / "hf")


@pytest.fixture(scope="session")
def llama2c_dir(shared_dir: Path) -> Path:
    return _need(shared_dir / "models" / "stories260K" / "llama2c")


@pytest.fixture(scope="session")
def minilm_dir(shared_dir: Path) -> Path:
    return _need(shared_dir / "models" / "all-MiniLM-L6-v2")
