"""Model presets: parameter counts equal Hugging Face's models built from the same configs (meta
device, no download), and the built Megatron models hold exactly that many parameters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO
from megatron_align.models.config import PRESETS, preset

PYTHIA = [n for n in PRESETS if n.startswith("pythia-")]
LLAMA = [n for n in PRESETS if n.startswith("llama") and n != "llama-tiny"]


def hf_neox_config(m):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=m.padded_vocab_size(), hidden_size=m.hidden_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                         intermediate_size=m.ffn_size, rotary_pct=m.rotary_percent, use_parallel_residual=True,
                         tie_word_embeddings=m.tie_embeddings, max_position_embeddings=m.max_position_embeddings)


def hf_llama_config(m):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=m.padded_vocab_size(), hidden_size=m.hidden_size,
                       num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                       num_key_value_heads=m.kv_heads, intermediate_size=m.ffn_size,
                       tie_word_embeddings=m.tie_embeddings, max_position_embeddings=m.max_position_embeddings)


def hf_count(m) -> int:
    from transformers import AutoModelForCausalLM

    cfg = hf_neox_config(m) if m.arch == "gpt_neox" else hf_llama_config(m)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", PYTHIA + LLAMA)
def test_preset_param_count_matches_hf(name):
    m = preset(name)
    assert m.num_params() == hf_count(m)


def test_pythia_6_9b_count():
    assert preset("pythia-6.9b").num_params() == 6_857_302_016


_BUILD = """
import json, sys
from megatron_align.runtime import distributed as D
from megatron_align.models.config import preset
from megatron_align.models.build import transformer_config, build_model
from megatron_align.training.config import ParallelConfig, PrecisionConfig
D.init_process_group(); p = ParallelConfig(); D.init_parallel_state(p, 1)
out = {}
for name, vocab in [("tiny", 1000), ("llama-tiny", 1000), ("pythia-14m", None)]:
    m = preset(name, **({"vocab_size": vocab} if vocab else {}))
    model = build_model(m, transformer_config(m, p, PrecisionConfig()))
    out[name] = [sum(x.numel() for x in model.parameters()), m.num_params()]
print(json.dumps(out))
"""


def test_built_megatron_models_match_formula():
    p = subprocess.run([sys.executable, "-c", _BUILD], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    counts = json.loads(p.stdout.strip().splitlines()[-1])
    for name, (built, formula) in counts.items():
        assert built == formula, name
