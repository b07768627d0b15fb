"""Greedy, length-bounded generation for chat models: vLLM when it imports and a GPU is there,
Hugging Face ``generate`` (left-padded batches) otherwise."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def render_chat(tok, messages: list[dict]) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates that reject a system role
        if messages and messages[0]["role"] == "system":
            merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return tok.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        raise


def vllm_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken vLLM install must not stop the HF path
        return False
    return True


def generate_vllm(model_path: str, prompts: Sequence[str], max_new_tokens: int) -> list[str]:  # pragma: no cover
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outs = llm.generate(list(prompts), params)
    return [o.outputs[0].text for o in outs]


@torch.no_grad()
def generate_hf(model, tok, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 16,
                progress: Callable[[int], None] | None = None) -> list[str]:
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            # Chat templates already contain BOS where the model wants it.
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            for i, ids in zip(idx, new):
                out[i] = tok.decode(ids, skip_special_tokens=True)
            if progress is not None:
                progress(len(idx))
    finally:
        tok.padding_side = old_side
    return out
