"""config.json <-> ModelConfig on the published configs of the models the study imports."""

from __future__ import annotations

import pytest

from megatron_align.config import ConfigError
from megatron_align.convert.hf_config import hf_config_from_model, model_config_from_hf
from megatron_align.models.config import preset

# As published on the Hub (classic keys, transformers 4.x).
PYTHIA_1B = {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
             "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192, "layer_norm_eps": 1e-05,
             "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8,
             "num_hidden_layers": 16, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
             "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304}
LLAMA32_1B = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
              "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
              "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
              "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
              "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256}

FIELDS = ["arch", "num_layers", "hidden_size", "num_attention_heads", "kv_heads", "ffn_size", "vocab_size",
          "rotary_percent", "rotary_base", "rope_scaling", "norm_epsilon", "tie_embeddings",
          "max_position_embeddings"]


@pytest.mark.parametrize("raw,name", [(PYTHIA_1B, "pythia-1b"), (LLAMA32_1B, "llama3.2-1b")])
def test_published_configs_match_presets(raw, name):
    got, want = model_config_from_hf(raw), preset(name)
    assert {f: getattr(got, f) for f in FIELDS} == {f: getattr(want, f) for f in FIELDS}
    if want.rope_scaling:
        assert got.rope_scaling_factor == want.rope_scaling_factor


@pytest.mark.parametrize("raw", [PYTHIA_1B, LLAMA32_1B])
def test_written_config_reads_back_in_transformers(raw, tmp_path):
    import json

    from transformers import AutoConfig

    cfg = model_config_from_hf(raw)
    out = hf_config_from_model(cfg, dtype="bf16")
    assert model_config_from_hf(out) == cfg
    (tmp_path / "config.json").write_text(json.dumps(out))
    hf = AutoConfig.from_pretrained(str(tmp_path))
    rope = getattr(hf, "rope_parameters", None) or {}
    if cfg.arch == "gpt_neox":
        assert rope.get("partial_rotary_factor", getattr(hf, "rotary_pct", None)) == 0.25
    else:
        assert hf.num_key_value_heads == 8 and (rope.get("rope_type") or hf.rope_scaling["rope_type"]) == "llama3"
        assert rope.get("factor", 32.0) == 32.0 and rope.get("rope_theta", getattr(hf, "rope_theta", None)) == 500000.0


def test_llama3_scaling_outside_megatron_is_refused():
    raw = {**LLAMA32_1B, "rope_scaling": {**LLAMA32_1B["rope_scaling"], "high_freq_factor": 2.0}}
    with pytest.raises(ConfigError, match="high_freq_factor"):
        model_config_from_hf(raw)
