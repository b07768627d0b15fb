"""DPO / IPO / RPO losses and metrics agree with TRL's DPOTrainer on identical log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_align.posttrain.losses import pair_metrics, preference_loss, sequence_logps
from trl_reference import trl_dpo


def _batch(B=6, L=12, seed=0, equal_chosen=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, L + 1)
    for i in range(2 * B):
        start = int(torch.randint(1, 5, (1,), generator=g))
        n = 5 if (equal_chosen and i < B) else int(torch.randint(2, L + 1 - start, (1,), generator=g))
        mask[i, start:start + n] = 1
    tok = -torch.rand(2 * B, L, generator=g, dtype=torch.float64) * 3
    tok = (tok * mask[:, 1:]).float()
    ref = -torch.rand(2 * B, generator=g) * 20
    return tok, mask, ref[:B], ref[B:]


def _ours(tok, mask, ref_c, ref_r, **kw):
    m = mask[:, 1:]
    logps = sequence_logps(tok, m)
    lens = m.sum(-1)
    B = tok.shape[0] // 2
    return preference_loss(logps[:B], logps[B:], ref_c, ref_r, chosen_len=lens[:B], rejected_len=lens[B:], **kw)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_matches_trl(beta):
    tok, mask, rc, rr = _batch()
    loss, m = trl_dpo(tok, mask, rc, rr, beta=beta)
    s = _ours(tok, mask, rc, rr, beta=beta)
    assert s.losses.mean().item() == pytest.approx(loss.item(), abs=1e-6)
    assert s.chosen_rewards.mean().item() == pytest.approx(m["rewards/chosen"], abs=1e-6)
    assert s.rejected_rewards.mean().item() == pytest.approx(m["rewards/rejected"], abs=1e-6)
    assert s.accuracies.mean().item() == pytest.approx(m["rewards/accuracies"], abs=1e-9)
    assert 0 < m["rewards/accuracies"] < 1  # the batch exercises both outcomes
    assert s.margins.mean().item() == pytest.approx(m["rewards/margins"], abs=1e-6)
    assert s.chosen_logps.mean().item() == pytest.approx(m["logps/chosen"], abs=1e-5)
    assert s.rejected_logps.mean().item() == pytest.approx(m["logps/rejected"], abs=1e-5)


def test_ipo_matches_trl():
    tok, mask, rc, rr = _batch(seed=1)
    loss, _ = trl_dpo(tok, mask, rc, rr, beta=0.2, loss_types=("ipo",))
    s = _ours(tok, mask, rc, rr, beta=0.2, loss_type="ipo")
    assert s.losses.mean().item() == pytest.approx(loss.item(), rel=1e-6)


def test_length_averaged_matches_trl_sigmoid_norm():
    tok, mask, rc, rr = _batch(seed=2)
    loss, _ = trl_dpo(tok, mask, rc, rr, beta=0.3, loss_types=("sigmoid_norm",))
    s = _ours(tok, mask, rc, rr, beta=0.3, average_log_probs=True)
    assert s.losses.mean().item() == pytest.approx(loss.item(), abs=1e-6)


def test_rpo_matches_trl_sigmoid_plus_sft():
    # TRL's SFT term is a token mean over the batch, ours a mean over pairs of each chosen
    # response's token mean (NeMo-Aligner); they coincide when chosen responses are equally long.
    tok, mask, rc, rr = _batch(seed=3, equal_chosen=True)
    loss, _ = trl_dpo(tok, mask, rc, rr, beta=0.1, loss_types=("sigmoid", "sft"), loss_weights=(1.0, 0.7))
    s = _ours(tok, mask, rc, rr, beta=0.1, loss_type="rpo", sft_weight=0.7)
    assert s.losses.mean().item() == pytest.approx(loss.item(), abs=1e-6)


def test_equal_policy_and_reference_give_log2_and_metric_sums():
    c, r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    s = preference_loss(c, r, c.clone(), r.clone(), beta=0.1)
    assert torch.allclose(s.losses, torch.full((2,), math.log(2.0)))
    m = pair_metrics(s)
    assert m["dpo loss"].tolist() == pytest.approx([2 * math.log(2.0), 2.0])
    assert m["reward accuracy"].tolist() == [0.0, 2.0]  # ties are not correct (as TRL)
    assert m["logps chosen"].tolist() == [-8.0, 2.0]


def test_gradient_flows_only_through_policy():
    c = torch.tensor([-3.0], requires_grad=True)
    r = torch.tensor([-4.0], requires_grad=True)
    s = preference_loss(c, r, torch.tensor([-3.5]), torch.tensor([-3.5]), beta=1.0)
    s.losses.sum().backward()
    # d/dc -logsigmoid(c - r + const) = -(1 - sigmoid(.)) and the opposite for r
    z = torch.sigmoid(torch.tensor((-3.0 + 3.5) - (-4.0 + 3.5)))
    assert c.grad.item() == pytest.approx(-(1 - z.item()))
    assert r.grad.item() == pytest.approx(1 - z.item())
