"""Shared test fixtures: tiny configs and the reference checkpoint location."""

import os
from pathlib import Path

import pytest
import torch

import neobert  # noqa: F401  (registers the Auto classes)
from neobert import NeoBERTConfig

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "neobert-reference-tiny"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy CPU, syncing them costs 3x.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config() -> NeoBERTConfig:
    torch.manual_seed(0)
    return NeoBERTConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=100, max_length=64
    )


def require_fixture(path: Path) -> Path:
    """``path`` if it holds a checkpoint; else a skip on a developer's machine, and a failure
    in CI (``CI`` set, as CI services and .ci/run do), where the parity test must run."""
    if not (path / "model.safetensors").exists():
        message = f"reference fixture not found at {path}"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{message}: CI must provide ../shared/fixtures", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture
def reference_dir() -> Path:
    return require_fixture(REFERENCE)
