"""Tiny random Hugging Face models built from configs (no download) and helpers of the convert tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
VOCAB = 250  # padded by Megatron to 256 at TP=1 and TP=2: exercises padding removal and restore
# Padded to 384 rows at TP=1 but 512 at TP=2: loading the TP=1 import at TP=2 must re-pad.
VOCAB_TP_PAD = 320


def _randomize(model, seed: int) -> None:
    """Every parameter random (HF inits biases to 0 and norms to 1, which would hide mapping bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)


def hf_config(kind: str):
    from transformers import GPTNeoXConfig, LlamaConfig

    if kind == "neox":
        return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=256, rotary_pct=0.25, rotary_emb_base=10000,
                             max_position_embeddings=256, use_parallel_residual=True, tie_word_embeddings=False,
                             layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
    if kind == "llama":  # multi-head attention, untied
        return LlamaConfig(vocab_size=VOCAB_TP_PAD, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=176, max_position_embeddings=256,
                           rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=1)
    if kind == "llama_gqa":  # 2 KV groups, tied embeddings, Llama-3.1 RoPE scaling
        return LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=176, max_position_embeddings=16384,
                           rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                           bos_token_id=0, eos_token_id=1)
    raise ValueError(kind)


def make_hf_model(out: Path, kind: str, *, seed: int = 0, max_shard_size: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind), dtype=torch.float32)
    _randomize(model, seed)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kw)
    return out


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(a_dir: Path, b_dir: Path, *, tied: bool = False) -> None:
    a, b = hf_tensors(a_dir), hf_tensors(b_dir)
    if tied:  # tied models may or may not carry lm_head.weight
        a.pop("lm_head.weight", None)
        b.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=tokens).logits


def torchrun(nproc: int, script: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           str(script), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-8000:]}")
    return p


def make_chat_tokenizer(out: Path, vocab: int = 256) -> Path:
    """A word-level HF tokenizer of exactly ``vocab`` ids with role tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "[UNK]"]
    words = [f"w{i}" for i in range(vocab - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + specials)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="[UNK]",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
                          "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
    fast.save_pretrained(str(out))
    return out


def read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text())
