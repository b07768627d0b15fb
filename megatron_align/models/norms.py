"""A torch LayerNorm / RMSNorm that works with sequence parallelism in Megatron-Core's local specs.

Megatron's local ``WrappedTorchNorm`` refuses sequence parallelism because its weights lack the
``sequence_parallel`` mark that makes ``finalize_model_grads`` all-reduce their gradients across the
tensor-parallel group (each rank saw only its slice of the sequence). Apex's and TE's norms carry
that mark; this one carries it too, so TP + SP trains correctly without either.
"""

from __future__ import annotations

import torch


class SequenceParallelTorchNorm:
    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))
        return norm
