"""Shared fixtures. Integration tests run the real components: the Tansu broker
process, gloo process groups, DeepSpeed, Ray, FAISS."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(ROOT))


@pytest.fixture
def broker():
    from cluster.broker import LocalBroker

    with LocalBroker() as b:
        yield b


@pytest.fixture
def kafka_cfg():
    from streaming.config import KafkaConfig

    return KafkaConfig()
