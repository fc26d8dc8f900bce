"""Test-wide settings: offline, on CPU, storage in a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before anything imports huggingface_hub / datasets / deepspeed.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RLHF_DEVICE="cpu",
                  DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def storage(tmp_path_factory) -> Path:
    """One shared storage root for the session: the tiny model and tokenised data are
    built once and reused, as on a real deployment."""
    root = tmp_path_factory.mktemp("storage")
    os.environ["RLHF_STORAGE"] = str(root)
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-datasets")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(storage) -> Path:
    from rlhf_tasks.models import resolve_model_path

    return Path(resolve_model_path("builtin:tiny-opt"))
