"""Model configs and named presets (Pythia / GPT-NeoX, Llama, tiny test models).

A :class:`ModelConfig` is architecture only; parallelism and precision come from the run config
and meet it in :func:`megatron_align.models.build.transformer_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from megatron_align.config import ConfigError


@dataclass
class ModelConfig:
    # Named preset; its values fill every key the run config leaves out.
    preset: str | None = None
    arch: Literal["gpt_neox", "llama"] = "gpt_neox"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    # Llama GQA: number of key/value heads. None = multi-head attention.
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    # The tokenizer's vocabulary (with added tokens). None: taken from the run's tokenizer.
    vocab_size: int | None = None
    # Megatron pads the embedding to a multiple of this x TP size (and strips it on HF export).
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 2048
    rotary_percent: float = 1.0
    rotary_base: float = 10000.0
    # Llama-3.1-style RoPE frequency scaling.
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    tie_embeddings: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    @property
    def normalization(self) -> str:
        return "LayerNorm" if self.arch == "gpt_neox" else "RMSNorm"

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.kv_heads}")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"model.rotary_percent={self.rotary_percent} must be in (0, 1]")
        if self.arch == "gpt_neox" and self.num_query_groups not in (None, self.num_attention_heads):
            raise ConfigError("model.num_query_groups: GPT-NeoX has no grouped-query attention; leave it unset")

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Megatron's rule: pad to a multiple of ``make_vocab_size_divisible_by * TP``."""
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is unset: give it or a tokenizer")
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_params(self, tensor_parallel: int = 1, include_embeddings: bool = True) -> int:
        """Parameter count of the whole (unsharded) model with Megatron's padded vocabulary."""
        h, f, L = self.hidden_size, self.ffn_size, self.num_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        neox = self.arch == "gpt_neox"
        qkv = h * (q + 2 * kv) + ((q + 2 * kv) if neox else 0)
        proj = q * h + (h if neox else 0)
        if neox:
            mlp = h * f + f + f * h + h
            norms = 4 * h
        else:
            mlp = h * 2 * f + f * h
            norms = 2 * h
        per_layer = qkv + proj + mlp + norms
        final_norm = 2 * h if neox else h
        total = L * per_layer + final_norm
        if include_embeddings:
            v = self.padded_vocab_size(tensor_parallel)
            total += v * h * (1 if self.tie_embeddings else 2)
        return total

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x matmul params + attention scores."""
        matmul_params = self.num_params(include_embeddings=False) + self.padded_vocab_size() * self.hidden_size
        attn = 12 * self.num_layers * self.hidden_size * seq_length
        return 6.0 * matmul_params + attn


def _pythia(h: int, layers: int, heads: int, vocab: int = 50304) -> dict:
    return dict(arch="gpt_neox", num_layers=layers, hidden_size=h, num_attention_heads=heads,
                ffn_hidden_size=4 * h, vocab_size=vocab, rotary_percent=0.25, rotary_base=10000.0,
                norm_epsilon=1e-5, max_position_embeddings=2048, tie_embeddings=False)


def _llama(h: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, theta: float,
           tie: bool = False, eps: float = 1e-5, max_pos: int = 4096, **extra) -> dict:
    return dict(arch="llama", num_layers=layers, hidden_size=h, num_attention_heads=heads,
                num_query_groups=kv, ffn_hidden_size=ffn, vocab_size=vocab, rotary_percent=1.0,
                rotary_base=theta, norm_epsilon=eps, max_position_embeddings=max_pos,
                tie_embeddings=tie, **extra)


# Values of the Hugging Face configs (EleutherAI/pythia-*, meta-llama/*).
PRESETS: dict[str, dict] = {
    "pythia-14m": _pythia(128, 6, 4),
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
    "pythia-6.9b": _pythia(4096, 32, 32, vocab=50432),
    "pythia-12b": _pythia(5120, 36, 40, vocab=50688),
    "llama2-7b": _llama(4096, 32, 32, 32, 11008, 32000, 10000.0, eps=1e-5),
    "llama3-8b": _llama(4096, 32, 32, 8, 14336, 128256, 500000.0, max_pos=8192),
    "llama3.2-1b": _llama(2048, 16, 32, 8, 8192, 128256, 500000.0, tie=True, max_pos=131072,
                          rope_scaling=True, rope_scaling_factor=32.0),
    # For tests and the tiny study: a few hundred thousand parameters, seconds per step on a CPU.
    "tiny": dict(arch="gpt_neox", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                 rotary_percent=0.25, max_position_embeddings=512, make_vocab_size_divisible_by=64),
    "llama-tiny": dict(arch="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=176, rotary_percent=1.0, rotary_base=10000.0,
                       max_position_embeddings=512, make_vocab_size_divisible_by=64),
}


def resolve_model_section(section: dict | None, where: str = "model") -> dict:
    """Expand ``preset:`` into its values, with the section's own keys on top."""
    section = dict(section or {})
    name = section.get("preset")
    if name is None:
        return section
    if name not in PRESETS:
        import difflib

        near = difflib.get_close_matches(str(name), list(PRESETS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"{where}.preset: unknown preset {name!r}{hint}; known: {', '.join(PRESETS)}")
    return {**PRESETS[name], **section}


def preset(name: str, **overrides) -> ModelConfig:
    """``preset("pythia-160m")`` -> a ModelConfig (the OLMo-core style named constructor)."""
    from megatron_align.config import from_dict

    cfg = from_dict(ModelConfig, resolve_model_section({"preset": name, **overrides}))
    cfg.validate()
    return cfg


def replace(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, **changes)
