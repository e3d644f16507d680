"""Shared test fixtures: tiny configs and the reference checkpoint location."""

from pathlib import Path

import pytest
import torch

import neobert  # noqa: F401  (registers the Auto classes)
from neobert import NeoBERTConfig

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "neobert-reference-tiny"


@pytest.fixture
def tiny_config() -> NeoBERTConfig:
    torch.manual_seed(0)
    return NeoBERTConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=100, max_length=64
    )


@pytest.fixture
def reference_dir() -> Path:
    if not (REFERENCE / "model.safetensors").exists():
        pytest.skip(f"reference fixture not found at {REFERENCE}")
    return REFERENCE
