import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test subprocesses (`python -c`, `python -m`) would put the working directory, the repository
# root, first on sys.path, where the top-level kernels/ is found as `kernels` (it then hands that
# name to Hugging Face's package, which transformers imports: tests/test_packaging.py checks that
# without this setting); the README's pytest command passes -P for this process.
os.environ.setdefault("PYTHONSAFEPATH", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
STORIES = SHARED / "models" / "stories260k"
WIKITEXT = SHARED / "corpora" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (../shared assets)")


@pytest.fixture
def one_config(monkeypatch):
    """One fitting kernel config instead of autotuning (correctness, not speed, is tested): a
    compile per shape variant, not one per config. Every autotuned kernel asks
    triton_estimators.autotuning(), so this one switch covers them all."""
    from patchattn.kernels import triton_estimators

    monkeypatch.setattr(triton_estimators, "_AUTOTUNE", False)
