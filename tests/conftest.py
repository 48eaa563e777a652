"""Shared test fixtures: offline model hubs, small thread pools, seeded randomness."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
REAL_DICOM_DIR = SHARED_DIR / "data" / "real-dicom"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261127)


@pytest.fixture(scope="session")
def real_dicom_dir() -> Path:
    """The real Siemens exports beside the project; tests using them skip when absent."""
    if not REAL_DICOM_DIR.is_dir():
        pytest.skip(f"real DICOM folder not found at {REAL_DICOM_DIR} (../shared/data/real-dicom)")
    return REAL_DICOM_DIR


@pytest.fixture(autouse=True, scope="session")
def _small_thread_pools() -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(2)
