"""TRL's DPO loss and metrics on given per-token log-probs: ``DPOTrainer._compute_loss`` itself,
run on a stand-in trainer and a stand-in model that returns the log-probs we give it."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch


class _Acc:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x


def trl_dpo(per_token_logps: torch.Tensor, completion_mask: torch.Tensor, ref_chosen: torch.Tensor,
            ref_rejected: torch.Tensor, *, beta: float, loss_types=("sigmoid",), loss_weights=None):
    """per_token_logps: [2B, L] (chosen rows first, zero outside the completion);
    completion_mask: [2B, L + 1] over input ids (TRL shifts it by one). Returns (loss, metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n2, L = per_token_logps.shape
    out = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(n2, L), mean_logits=torch.zeros(n2, L),
                          is_top1=torch.zeros(n2, L, dtype=torch.bool))
    model = lambda **kw: out  # noqa: E731
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Acc(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=list(loss_types),
        loss_weights=list(loss_weights or [1.0] * len(loss_types)), beta=beta, use_weighting=False,
        label_smoothing=0.0, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n2, L + 1, dtype=torch.long), "attention_mask": torch.ones(n2, L + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(stub, model, inputs, False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}
