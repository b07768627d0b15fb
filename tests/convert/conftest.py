"""Fixtures of the convert tests; helpers live in convert_fixtures.py (a unique module name)."""

from __future__ import annotations

import pytest
from convert_fixtures import make_hf_model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Random-init HF models of each architecture (shared; tests must not modify them)."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "neox": make_hf_model(root / "neox", "neox", seed=1),
        "llama": make_hf_model(root / "llama", "llama", seed=2),
        # Sharded on save, so imports read an index + several files.
        "llama_gqa": make_hf_model(root / "llama_gqa", "llama_gqa", seed=3, max_shard_size="100KB"),
    }


@pytest.fixture(scope="session")
def imported(hf_models, tmp_path_factory):
    """Each HF model imported to a Megatron checkpoint at TP=PP=1."""
    from megatron_align.convert.import_hf import import_hf

    root = tmp_path_factory.mktemp("imported")
    return {k: import_hf(v, root / k, progress=False)["out"] for k, v in hf_models.items()}
