"""Packed rows on the Megatron model: isolation is exact, and DPO through the task's forward_step
equals TRL's DPO loss computed from ordinary, unpacked log-probs of the same model.

(The HF -> Megatron importer is being written concurrently; until then the "tiny HF model" side of
the end-to-end check is the same Megatron model run on unpacked rows with a plain causal mask, and
TRL's own ``DPOTrainer._compute_loss`` on those log-probs.)
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from megatron_align.posttrain.config import DPOConfig, DPOSection
from megatron_align.posttrain.packing import build_row, document_causal_mask
from trl_reference import trl_dpo

VOCAB = 101


@pytest.fixture(scope="module")
def model():
    from megatron_align.config import from_dict
    from megatron_align.models.config import resolve_model_section
    from megatron_align.runtime import distributed as rt
    from megatron_align.training.trainer import build_model_chunks

    cfg = from_dict(DPOConfig, {"model": resolve_model_section({"preset": "tiny", "vocab_size": VOCAB}),
                                "precision": {"dtype": "fp32"}, "training": {"seq_length": 24, "train_steps": 1}})
    rt.init_process_group()
    rt.init_parallel_state(cfg.parallel, 11)
    m = build_model_chunks(cfg, wrap_ddp=False)[0]
    m.eval()
    yield cfg, m
    rt.destroy()


def _example(rng, n, prompt):
    ids = rng.integers(2, VOCAB, size=n).astype(np.int32)
    mask = np.zeros(n, np.uint8)
    mask[prompt:] = 1
    return ids, mask


def _alone(model, ids, S):
    """Per-token loss of one example in its own row with the default causal mask."""
    row = build_row([(ids, np.ones(len(ids), np.uint8))], S, 0)
    t = lambda k: torch.from_numpy(row[k])[None].long()  # noqa: E731
    with torch.no_grad():
        return model(t("tokens"), t("position_ids"), None, labels=t("labels"))[0, : len(ids) - 1]


def test_packed_row_equals_samples_alone(model):
    cfg, m = model
    rng = np.random.default_rng(0)
    exs = [_example(rng, n, 2) for n in (7, 9, 5)]
    S = 24
    row = build_row(exs, S, 0)
    b = {k: torch.from_numpy(np.asarray(row[k]))[None] for k in ("tokens", "labels", "position_ids", "segment_ids")}
    with torch.no_grad():
        packed = m(b["tokens"].long(), b["position_ids"].long(), document_causal_mask(b["segment_ids"].long()),
                   labels=b["labels"].long())[0]
        causal_only = m(b["tokens"].long(), b["position_ids"].long(), None, labels=b["labels"].long())[0]
    at = 0
    for ids, _ in exs:
        n = len(ids) - 1
        alone = _alone(m, ids, S)
        assert torch.allclose(packed[at:at + n], alone, atol=1e-5), (at, (packed[at:at + n] - alone).abs().max())
        at += n
    # Without the mask the later samples see the earlier ones: the mask is what isolates them.
    assert (causal_only[7:at] - packed[7:at]).abs().max() > 1e-3
    assert row["position_ids"][:at].tolist() == list(range(6)) + list(range(8)) + list(range(4))


@pytest.mark.parametrize("mask_vocab", [True, False])
def test_dpo_task_loss_equals_trl_on_unpacked_logprobs(model, mask_vocab):
    from megatron_align.posttrain.tasks import DPOTask, PairRows

    cfg, m = model
    S, B = 24, 4
    rng = np.random.default_rng(1)
    # Pairs with a shared prompt; reference log-probs from another "model": fixed numbers.
    pairs = []
    for _ in range(B):
        p = int(rng.integers(3, 7))
        prompt = rng.integers(2, VOCAB, size=p).astype(np.int32)
        c = np.concatenate([prompt, rng.integers(2, VOCAB, size=int(rng.integers(2, 12)))]).astype(np.int32)
        r = np.concatenate([prompt, rng.integers(2, VOCAB, size=int(rng.integers(2, 12)))]).astype(np.int32)
        mk = lambda x: np.r_[np.zeros(p, np.uint8), np.ones(len(x) - p, np.uint8)]  # noqa: E731
        pairs.append(((c, mk(c)), (r, mk(r))))
    ref = rng.uniform(-60, -20, size=(B, 2))

    class Data:
        path = None

        def __len__(self):
            return B

        def get(self, stream, i):
            return pairs[i][0 if stream == "chosen" else 1]

    for loss_type, kw in (("sigmoid", {}), ("ipo", {}), ("rpo", {"sft_weight": 0.5})):
        section = DPOSection(train=["x"], beta=0.2, loss_type=loss_type, mask_padded_vocab=mask_vocab, **kw)
        task = DPOTask(cfg, section, Data(), None)
        ds = PairRows(Data(), np.arange(B), S, 0, ref)
        batch = task.collate([ds[i] for i in range(B)])
        out, loss_fn = task.forward_step(iter([batch]), m)
        loss_sum, n, metrics = loss_fn(out)
        ours = loss_sum.item() / int(n)

        # TRL side: each sequence alone, log-probs from log_softmax of the logits.
        L = S
        tok_logps = torch.zeros(2 * B, L)
        comp = torch.zeros(2 * B, L + 1)
        for side in (0, 1):
            for i, pr in enumerate(pairs):
                ids, mask = pr[side]
                row = build_row([(ids, mask)], S, 0)
                t = lambda k: torch.from_numpy(row[k])[None].long()  # noqa: E731
                with torch.no_grad():
                    logits = m(t("tokens"), t("position_ids"), None)[0]
                # VOCAB=101 is padded to 128 rows: masked, the softmax spans the real vocabulary only
                # (what the exported HF model computes); unmasked, all rows (Megatron's pretraining loss).
                lp = torch.log_softmax(logits.float()[..., :VOCAB] if mask_vocab else logits.float(), -1).gather(-1, t("labels")[0, :, None])[:, 0]
                j = side * B + i
                tok_logps[j] = lp * torch.from_numpy(row["loss_mask"])
                comp[j, : len(ids)] = torch.from_numpy(mask.astype(np.float32))
        types = {"sigmoid": ("sigmoid",), "ipo": ("ipo",), "rpo": ("sigmoid", "sft")}[loss_type]
        weights = (1.0, 0.5) if loss_type == "rpo" else None
        if loss_type == "rpo":
            # TRL's SFT term is a batch token mean; ours a per-pair mean: compare the DPO part + our SFT term.
            trl_loss, trl_m = trl_dpo(tok_logps, comp, torch.tensor(ref[:, 0]).float(), torch.tensor(ref[:, 1]).float(),
                                      beta=0.2, loss_types=("sigmoid",))
            clen = comp[:B].sum(-1)
            sft = (-(tok_logps[:B].sum(-1)) / clen).mean()
            trl_loss = trl_loss + 0.5 * sft
        else:
            trl_loss, trl_m = trl_dpo(tok_logps, comp, torch.tensor(ref[:, 0]).float(),
                                      torch.tensor(ref[:, 1]).float(), beta=0.2, loss_types=types, loss_weights=weights)
        assert ours == pytest.approx(trl_loss.item(), abs=1e-5), loss_type
        if loss_type == "sigmoid":
            g = lambda k: (metrics[k][0] / metrics[k][1]).item()  # noqa: E731
            assert g("rewards chosen") == pytest.approx(trl_m["rewards/chosen"], abs=1e-5)
            assert g("rewards rejected") == pytest.approx(trl_m["rewards/rejected"], abs=1e-5)
            assert g("reward accuracy") == pytest.approx(trl_m["rewards/accuracies"])
            assert g("logps chosen") == pytest.approx(trl_m["logps/chosen"], abs=1e-4)
