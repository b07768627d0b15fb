"""Parameter-by-parameter correspondence between Megatron global tensors and HF checkpoints.

Each :class:`Rule` maps one Megatron dist-checkpoint key (per layer for ``decoder.layers.*``) to one
or more Hugging Face tensors and back. Every transform is a pure re-arrangement (slicing,
concatenation, reshapes), so a round trip is bit-exact.

QKV layouts:
* Megatron's fused ``linear_qkv`` is ``[groups, (q_per_group + 2) * head_dim, hidden]``: for each
  key/value group its query heads, then its key head, then its value head.
* GPT-NeoX's ``query_key_value`` is per head ``[q, k, v]``: for multi-head attention (groups =
  heads) that *is* Megatron's layout, so NeoX maps 1:1.
* Llama keeps separate ``q_proj``/``k_proj``/``v_proj``; with GQA the query heads of group g are
  ``g * q_per_group ... (g + 1) * q_per_group - 1``.

HF Llama stores q/k already permuted for ``rotate_half`` RoPE, which is also Megatron's
(non-interleaved) convention, so no RoPE permutation is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_align.models.config import ModelConfig

ToHF = Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]]
ToMeg = Callable[[list[torch.Tensor], ModelConfig], torch.Tensor]


@dataclass(frozen=True)
class Rule:
    megatron: str          # dist-checkpoint key (without the layer index for layer rules)
    hf: tuple[str, ...]    # HF names; "{i}" is the layer index
    layered: bool
    to_hf: ToHF
    to_megatron: ToMeg
    # Rows beyond model.vocab_size are Megatron's padding (embedding / output layer).
    vocab: bool = False

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [n.format(i=layer) for n in self.hf]


def _same(t, cfg):
    return [t]


def _same_back(ts, cfg):
    return ts[0]


def _split_qkv(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    g, d, h = cfg.kv_heads, cfg.head_dim, cfg.hidden_size
    qpg = cfg.num_attention_heads // g
    t = t.reshape(g, qpg + 2, d, h)
    q = t[:, :qpg].reshape(cfg.num_attention_heads * d, h)
    k = t[:, qpg].reshape(g * d, h)
    v = t[:, qpg + 1].reshape(g * d, h)
    return [q, k, v]


def _merge_qkv(ts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    q, k, v = ts
    g, d = cfg.kv_heads, cfg.head_dim
    qpg = cfg.num_attention_heads // g
    h = q.shape[-1]
    return torch.cat([q.reshape(g, qpg, d, h), k.reshape(g, 1, d, h), v.reshape(g, 1, d, h)], dim=1).reshape(-1, h)


def _split_fc1(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    gate, up = t.chunk(2, dim=0)
    return [gate, up]


def _merge_fc1(ts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _rule(meg, hf, layered=True, to_hf=_same, to_meg=_same_back, vocab=False) -> Rule:
    return Rule(meg, tuple([hf] if isinstance(hf, str) else hf), layered, to_hf, to_meg, vocab)


L = "decoder.layers."

NEOX_RULES = [
    _rule("embedding.word_embeddings.weight", "gpt_neox.embed_in.weight", layered=False, vocab=True),
    _rule(L + "self_attention.linear_qkv.layer_norm_weight", "gpt_neox.layers.{i}.input_layernorm.weight"),
    _rule(L + "self_attention.linear_qkv.layer_norm_bias", "gpt_neox.layers.{i}.input_layernorm.bias"),
    _rule(L + "self_attention.linear_qkv.weight", "gpt_neox.layers.{i}.attention.query_key_value.weight"),
    _rule(L + "self_attention.linear_qkv.bias", "gpt_neox.layers.{i}.attention.query_key_value.bias"),
    _rule(L + "self_attention.linear_proj.weight", "gpt_neox.layers.{i}.attention.dense.weight"),
    _rule(L + "self_attention.linear_proj.bias", "gpt_neox.layers.{i}.attention.dense.bias"),
    _rule(L + "mlp.linear_fc1.layer_norm_weight", "gpt_neox.layers.{i}.post_attention_layernorm.weight"),
    _rule(L + "mlp.linear_fc1.layer_norm_bias", "gpt_neox.layers.{i}.post_attention_layernorm.bias"),
    _rule(L + "mlp.linear_fc1.weight", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight"),
    _rule(L + "mlp.linear_fc1.bias", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias"),
    _rule(L + "mlp.linear_fc2.weight", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight"),
    _rule(L + "mlp.linear_fc2.bias", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias"),
    _rule("decoder.final_layernorm.weight", "gpt_neox.final_layer_norm.weight", layered=False),
    _rule("decoder.final_layernorm.bias", "gpt_neox.final_layer_norm.bias", layered=False),
    _rule("output_layer.weight", "embed_out.weight", layered=False, vocab=True),
]

LLAMA_RULES = [
    _rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", layered=False, vocab=True),
    _rule(L + "self_attention.linear_qkv.layer_norm_weight", "model.layers.{i}.input_layernorm.weight"),
    _rule(L + "self_attention.linear_qkv.weight",
          ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
           "model.layers.{i}.self_attn.v_proj.weight"], to_hf=_split_qkv, to_meg=_merge_qkv),
    _rule(L + "self_attention.linear_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    _rule(L + "mlp.linear_fc1.layer_norm_weight", "model.layers.{i}.post_attention_layernorm.weight"),
    _rule(L + "mlp.linear_fc1.weight", ["model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"],
          to_hf=_split_fc1, to_meg=_merge_fc1),
    _rule(L + "mlp.linear_fc2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    _rule("decoder.final_layernorm.weight", "model.norm.weight", layered=False),
    _rule("output_layer.weight", "lm_head.weight", layered=False, vocab=True),
]

# Linear layers whose Megatron ``_extra_state`` (TE/FP8 metadata) a dist checkpoint carries per layer.
EXTRA_STATE_KEYS = [L + "self_attention.linear_qkv._extra_state", L + "self_attention.linear_proj._extra_state",
                    L + "mlp.linear_fc1._extra_state", L + "mlp.linear_fc2._extra_state"]

# HF keys that are buffers (older transformers saved them), not weights: skipped on import.
HF_IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


def rules_for(cfg: ModelConfig) -> list[Rule]:
    rules = NEOX_RULES if cfg.arch == "gpt_neox" else LLAMA_RULES
    if cfg.tie_embeddings:
        rules = [r for r in rules if r.megatron != "output_layer.weight"]
    return rules


def megatron_shape(rule: Rule, cfg: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    """Expected global shape of ``rule.megatron`` (per layer for layered rules)."""
    h, f = cfg.hidden_size, cfg.ffn_size
    d = cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.kv_heads) * d
    name = rule.megatron.removeprefix(L)
    table = {
        "embedding.word_embeddings.weight": (padded_vocab, h),
        "output_layer.weight": (padded_vocab, h),
        "decoder.final_layernorm.weight": (h,), "decoder.final_layernorm.bias": (h,),
        "self_attention.linear_qkv.layer_norm_weight": (h,), "self_attention.linear_qkv.layer_norm_bias": (h,),
        "self_attention.linear_qkv.weight": (qkv, h), "self_attention.linear_qkv.bias": (qkv,),
        "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d), "self_attention.linear_proj.bias": (h,),
        "mlp.linear_fc1.layer_norm_weight": (h,), "mlp.linear_fc1.layer_norm_bias": (h,),
        "mlp.linear_fc1.weight": ((f if cfg.arch == "gpt_neox" else 2 * f), h), "mlp.linear_fc1.bias": (f,),
        "mlp.linear_fc2.weight": (h, f), "mlp.linear_fc2.bias": (h,),
    }
    return table[name]


def hf_shapes(rule: Rule, cfg: ModelConfig, padded_vocab: int) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of ``rule`` (computed on the meta device: no memory)."""
    meta = torch.empty(megatron_shape(rule, cfg, padded_vocab), device="meta")
    if rule.vocab:
        meta = meta[: cfg.vocab_size]
    return [tuple(t.shape) for t in rule.to_hf(meta, cfg)]
