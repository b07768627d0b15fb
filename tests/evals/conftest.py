import json

import pytest
from evals_fixtures import build_tokenizer, make_questions, random_model, save_hf


@pytest.fixture(scope="session")
def tiny_tok():
    return build_tokenizer()


@pytest.fixture(scope="session")
def random_model_dir(tiny_tok, tmp_path_factory):
    return save_hf(random_model(tiny_tok), tiny_tok, tmp_path_factory.mktemp("random_model"))


@pytest.fixture
def suite_file(tmp_path):
    p = tmp_path / "suite.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in make_questions()))
    return p


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These models are tiny: one thread is as fast, and on a shared, loaded CI machine OpenMP
    threads spinning against each other made these tests 3-4x slower. Restored after each test."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
