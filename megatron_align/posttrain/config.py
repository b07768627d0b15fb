"""``SFTConfig`` / ``DPOConfig``: a training run config plus an ``sft:`` / ``dpo:`` section.

Everything else (model, parallel, precision, optimizer, scheduler, training, init, checkpoint,
logging) is the pretraining config, so post-training runs on the same stack. ``data:`` (the
pretraining blend) is unused; ``training.train_steps`` may be left out and is then derived from
``epochs`` x examples / global batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_align.config import ConfigError
from megatron_align.posttrain.chat import ChatConfig
from megatron_align.training.config import TrainConfig


@dataclass
class ChatDataConfig:
    # JSONL files (tokenized into the run's data cache at start) or one directory from 'malign data chat'.
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    # Over-long records: error (stop naming file:line), drop (count, skip) or truncate (count, cut the end).
    truncation: Literal["error", "drop", "truncate"] = "error"
    # Malformed records (bad JSON, missing or empty fields): error, or skip and count them.
    on_error: Literal["error", "skip"] = "error"
    # Epochs over the training examples, each in a fresh seeded order.
    epochs: int = 1
    workers: int = 1
    chat: ChatConfig = field(default_factory=ChatConfig)
    # Leave Megatron's vocabulary padding rows out of the softmax, so log-probs are exactly those of
    # the exported (unpadded) Hugging Face model. False: the padded softmax, as pretraining computes it.
    mask_padded_vocab: bool = True

    def validate(self, where: str) -> None:
        if not self.train:
            raise ConfigError(f"{where}.train: give the training JSONL file(s) or a prepared directory")
        if self.epochs < 1:
            raise ConfigError(f"{where}.epochs must be >= 1")
        self.chat.validate(f"{where}.chat")


@dataclass
class SFTSection(ChatDataConfig):
    # pack: several examples per row, isolated (document-causal mask / cu_seqlens, position ids reset).
    # pad: one example per row, padded to seq_length.
    packing: Literal["pack", "pad"] = "pack"
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"


@dataclass
class DPOSection(ChatDataConfig):
    loss_type: Literal["sigmoid", "ipo", "rpo"] = "sigmoid"
    beta: float = 0.1
    # Weight of the chosen response's mean token NLL (rpo; also added to sigmoid / ipo when > 0).
    sft_weight: float = 0.0
    # Length-averaged log-probs in the loss and rewards (TRL's sigmoid_norm).
    average_log_probs: bool = False
    # precompute: a separate forward pass of the initial policy, stored beside the data; on_the_fly: a
    # frozen copy in memory beside the policy (pipeline parallel 1 only).
    reference: Literal["precompute", "on_the_fly"] = "precompute"

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta must be > 0")
        if self.loss_type == "rpo" and self.sft_weight <= 0:
            raise ConfigError(f"{where}.loss_type=rpo needs {where}.sft_weight > 0 (e.g. 1.0)")


class _NoBlend:
    """Stands in for ``data:`` during validation: post-training reads chat data, not a blend."""

    def validate(self) -> None:
        pass


def _validate_posttrain(cfg: TrainConfig, section, where: str, world_size: int | None) -> None:
    section.validate(where)
    t = cfg.training
    steps, data = t.train_steps, cfg.data
    if t.train_steps is None and t.train_tokens is None:
        t.train_steps = 1  # derived from epochs once the data is known; validate the rest now
    cfg.data = _NoBlend()
    try:
        TrainConfig.validate(cfg, world_size)
    finally:
        cfg.data, t.train_steps = data, steps
    if cfg.parallel.context > 1:
        raise ConfigError("parallel.context > 1 is not supported for post-training yet")


@dataclass
class SFTConfig(TrainConfig):
    sft: SFTSection = field(default_factory=SFTSection)

    def validate(self, world_size: int | None = None) -> None:
        _validate_posttrain(self, self.sft, "sft", world_size)


@dataclass
class DPOConfig(TrainConfig):
    dpo: DPOSection = field(default_factory=DPOSection)

    def validate(self, world_size: int | None = None) -> None:
        _validate_posttrain(self, self.dpo, "dpo", world_size)
        if self.dpo.reference == "on_the_fly" and self.parallel.pipeline > 1:
            raise ConfigError("dpo.reference=on_the_fly needs parallel.pipeline=1; use precompute")
