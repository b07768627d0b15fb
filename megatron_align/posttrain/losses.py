"""Preference losses on sequence log-probs: sigmoid DPO, IPO, and DPO + an SFT term (RPO-style).

Pure tensor functions, so they are checked against TRL's ``DPOTrainer`` on identical inputs
(tests/posttrain/test_losses.py) and reused unchanged by the Megatron loss function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "rpo")


@dataclass
class PairStats:
    """Per-pair tensors [n]; ``losses`` carries the gradient, the rest are detached."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        return (self.chosen_rewards > self.rejected_rewards).float()


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of per-token log-probs over the response tokens of each row."""
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
                    chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None,
                    average_log_probs: bool = False, sft_weight: float = 0.0) -> PairStats:
    """Per-pair preference loss from summed sequence log-probs ([n] each).

    * ``sigmoid``: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)) (Rafailov et al.).
      With ``average_log_probs`` the log-ratios are per-token means (TRL's ``sigmoid_norm``).
    * ``ipo``: (mean-token log-ratio margin - 1/(2 beta))^2, normalised by response length as in
      TRL and as the IPO authors confirmed their results use.
    * ``rpo``: sigmoid DPO plus ``sft_weight`` x the chosen response's mean token NLL.
    ``sft_weight`` also adds that term to sigmoid and ipo when non-zero.
    Rewards are beta x the (summed, or averaged with ``average_log_probs``) log-ratios.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    need_len = average_log_probs or loss_type in ("ipo", "rpo") or sft_weight
    if need_len and (chosen_len is None or rejected_len is None):
        raise ValueError("chosen_len and rejected_len are needed for ipo, rpo and average_log_probs")
    if need_len:
        cl = chosen_len.to(policy_chosen.dtype).clamp(min=1.0)
        rl = rejected_len.to(policy_chosen.dtype).clamp(min=1.0)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if average_log_probs:
        chosen_ratio, rejected_ratio = chosen_ratio / cl, rejected_ratio / rl
    if loss_type == "ipo":
        c, r = (chosen_ratio, rejected_ratio) if average_log_probs else (chosen_ratio / cl, rejected_ratio / rl)
        losses = (c - r - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if sft_weight:
        losses = losses + sft_weight * (-policy_chosen / cl)
    return PairStats(
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
        chosen_logps=policy_chosen.detach(),
        rejected_logps=policy_rejected.detach(),
    )


def pair_metrics(stats: PairStats) -> dict[str, torch.Tensor]:
    """{metric: tensor([sum, count])} for the trainer's global sum / count reporting."""
    n = torch.tensor(float(stats.losses.numel()), device=stats.losses.device)

    def sc(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.detach().float().sum(), n])

    return {
        "dpo loss": sc(stats.losses),
        "reward accuracy": sc(stats.accuracies),
        "rewards chosen": sc(stats.chosen_rewards),
        "rewards rejected": sc(stats.rejected_rewards),
        "reward margin": sc(stats.margins),
        "logps chosen": sc(stats.chosen_logps),
        "logps rejected": sc(stats.rejected_logps),
    }
