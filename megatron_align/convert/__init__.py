"""Megatron dist checkpoints <-> Hugging Face ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM``.

* :func:`export_checkpoint` (``malign export hf``) and :func:`import_hf` (``malign import hf``):
  streaming converters, one tensor in memory at a time.
* :func:`verify` (``malign export verify``): Megatron vs HF logits on the same tokens.
* :func:`load_hf_model_from_megatron`: a checkpoint as an in-memory HF model (for evals).
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def export_checkpoint(*args, **kwargs):
    from megatron_align.convert.export_hf import export_checkpoint as f

    return f(*args, **kwargs)


def import_hf(*args, **kwargs):
    from megatron_align.convert.import_hf import import_hf as f

    return f(*args, **kwargs)


def verify(*args, **kwargs):
    from megatron_align.convert.verify import verify as f

    return f(*args, **kwargs)


def load_hf_model_from_megatron(ckpt_dir, *, dtype: str = "fp32", step: int | None = None):
    """``(hf_model, tokenizer_or_None)`` for a Megatron checkpoint (a run's dir or a step dir).

    The weights go through the same streaming exporter into a temporary directory and are loaded
    by ``from_pretrained`` (memory-mapped safetensors), so this is exactly what an export would
    give, and the model's memory is the only full copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_align.convert.export_hf import export_checkpoint as export
    from megatron_align.convert.verify import dtype_kwarg

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with tempfile.TemporaryDirectory(prefix="malign-export-") as tmp:
        out = Path(tmp) / "hf"
        export(ckpt_dir, out, dtype=dtype, step=step, progress=False)
        model = AutoModelForCausalLM.from_pretrained(str(out), **dtype_kwarg(torch_dtype))
        # Materialise before the files go away (safetensors loads may stay memory-mapped).
        for p in model.parameters():
            p.data = p.data.clone()
        tokenizer = AutoTokenizer.from_pretrained(str(out)) if (out / "tokenizer.json").is_file() else None
    return model.eval(), tokenizer


__all__ = ["export_checkpoint", "import_hf", "verify", "load_hf_model_from_megatron"]
