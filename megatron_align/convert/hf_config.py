"""``config.json`` of a Hugging Face model <-> :class:`ModelConfig`.

Reads both the classic keys (``rotary_pct``, ``rotary_emb_base``, ``rope_theta``,
``rope_scaling``) and transformers 5's ``rope_parameters``; writes the classic keys, which every
transformers version reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_align.config import ConfigError
from megatron_align.models.config import ModelConfig

ARCHITECTURES = {"gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}
# Megatron-Core's Llama-3.1 RoPE scaling fixes these (only the factor is configurable).
_MCORE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope(raw: dict) -> dict:
    rp = dict(raw.get("rope_parameters") or {})
    if raw.get("rope_scaling"):
        rp.update(raw["rope_scaling"])
    return rp


def model_config_from_hf(raw: dict, where: str = "config.json") -> ModelConfig:
    """HF config dict -> ModelConfig, refusing anything Megatron's model would compute differently."""
    mtype = raw.get("model_type")
    archs = raw.get("architectures") or []
    if mtype not in ARCHITECTURES:
        raise ConfigError(f"{where}: model_type {mtype!r} ({', '.join(archs) or 'no architectures'}) is not supported; "
                          f"supported: GPT-NeoX (Pythia) and Llama ({', '.join(ARCHITECTURES.values())})")
    rp = _rope(raw)

    def need(key):
        if key not in raw:
            raise ConfigError(f"{where}: missing {key!r}")
        return raw[key]

    h, heads = need("hidden_size"), need("num_attention_heads")
    common = dict(num_layers=need("num_hidden_layers"), hidden_size=h, num_attention_heads=heads,
                  ffn_hidden_size=need("intermediate_size"), vocab_size=need("vocab_size"),
                  max_position_embeddings=raw.get("max_position_embeddings", 2048),
                  tie_embeddings=bool(raw.get("tie_word_embeddings", False)))
    if mtype == "gpt_neox":
        if not raw.get("use_parallel_residual", True):
            raise ConfigError(f"{where}: use_parallel_residual=false is not supported (every Pythia model uses the "
                              "parallel residual)")
        act = raw.get("hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported for GPT-NeoX (only exact 'gelu')")
        if raw.get("attention_bias", True) is False:
            raise ConfigError(f"{where}: attention_bias=false is not supported for GPT-NeoX")
        if rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
            raise ConfigError(f"{where}: RoPE scaling {rp.get('rope_type')!r} is not supported for GPT-NeoX")
        cfg = ModelConfig(arch="gpt_neox", **common,
                          rotary_percent=float(raw.get("rotary_pct", rp.get("partial_rotary_factor", 1.0))),
                          rotary_base=float(raw.get("rotary_emb_base", rp.get("rope_theta", 10000.0))),
                          norm_epsilon=float(raw.get("layer_norm_eps", 1e-5)))
    else:
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported for Llama (only 'silu')")
        for k in ("attention_bias", "mlp_bias"):
            if raw.get(k):
                raise ConfigError(f"{where}: {k}=true is not supported (Megatron's Llama has no linear biases)")
        head_dim = raw.get("head_dim")
        if head_dim is not None and head_dim != h // heads:
            raise ConfigError(f"{where}: head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                              f"{h // heads}; not supported")
        kv = raw.get("num_key_value_heads") or heads
        rtype = rp.get("rope_type", rp.get("type", "default"))
        scaling, factor = False, 8.0
        if rtype == "llama3":
            scaling, factor = True, float(rp["factor"])
            for k, v in _MCORE_LLAMA3.items():
                if k in rp and float(rp[k]) != v:
                    raise ConfigError(f"{where}: rope_scaling.{k}={rp[k]} is not supported (Megatron-Core fixes it "
                                      f"to {v})")
        elif rtype not in ("default", None):
            raise ConfigError(f"{where}: rope_scaling type {rtype!r} is not supported (default or llama3 only)")
        cfg = ModelConfig(arch="llama", **common, num_query_groups=None if kv == heads else kv,
                          rotary_percent=1.0, rotary_base=float(raw.get("rope_theta", rp.get("rope_theta", 10000.0))),
                          rope_scaling=scaling, rope_scaling_factor=factor,
                          norm_epsilon=float(raw.get("rms_norm_eps", 1e-6)))
    cfg.validate()
    return cfg


def load_hf_config(hf_dir: str | Path) -> tuple[ModelConfig, dict]:
    p = Path(hf_dir) / "config.json"
    if not p.is_file():
        raise ConfigError(f"{hf_dir}: no config.json; give a Hugging Face model directory")
    try:
        raw = json.loads(p.read_text())
    except ValueError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from e
    return model_config_from_hf(raw, where=str(p)), raw


def hf_config_from_model(cfg: ModelConfig, *, dtype: str, bos_id: int | None = None,
                         eos_id: int | None = None, pad_id: int | None = None) -> dict:
    """ModelConfig -> config.json for ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM``."""
    import transformers

    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    out = {
        "architectures": [ARCHITECTURES[cfg.arch]],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.ffn_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        # transformers >= 4.56 reads "dtype", older versions "torch_dtype".
        "dtype": torch_dtype,
        "torch_dtype": torch_dtype,
        "transformers_version": transformers.__version__,
    }
    if cfg.arch == "gpt_neox":
        out.update(hidden_act="gelu", rotary_pct=cfg.rotary_percent, rotary_emb_base=cfg.rotary_base,
                   layer_norm_eps=cfg.norm_epsilon, use_parallel_residual=True, attention_bias=True,
                   hidden_dropout=0.0, attention_dropout=0.0)
    else:
        out.update(hidden_act="silu", num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_epsilon,
                   rope_theta=cfg.rotary_base, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                   head_dim=cfg.head_dim,
                   rope_scaling=({"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **_MCORE_LLAMA3}
                                 if cfg.rope_scaling else None))
    return out
