"""Optional second stage of the filter: re-score blocklist-flagged documents with a classifier.

This is the design of the group's "Deep Ignorance" work (a fine-tuned ModernBERT scores the
documents the blocklist escalates). Any Hugging Face sequence-classification model directory
works; a flagged document is removed when P(label) >= threshold and kept otherwise. Only the
flagged documents (a few percent of a web corpus) reach this stage, so it runs in the main process.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_align.config import ConfigError


class SequenceClassifier:
    def __init__(self, path: str | os.PathLike, *, threshold: float = 0.5, label: str | None = None,
                 batch_size: int = 16, max_length: int = 512, device: str | None = None):
        p = Path(path)
        if not (p / "config.json").exists():
            raise ConfigError(f"classifier {str(path)!r}: not a Hugging Face model directory (no config.json); pass a "
                              "directory saved with save_pretrained, or leave --classifier unset")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = str(path)
        self.threshold = float(threshold)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path).to(self.device).eval()
        id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        n = self.model.config.num_labels
        self.multi_label = getattr(self.model.config, "problem_type", None) == "multi_label_classification" or n == 1
        if label is None:
            if n == 1:
                self.index = 0
            elif n == 2:
                self.index = 1
            else:
                raise ConfigError(f"classifier {self.path}: {n} labels ({', '.join(id2label.values())}); pass "
                                  "--classifier-label to say which one means AI discourse")
        else:
            matches = [i for i, v in id2label.items() if v == label]
            if not matches and label.isdigit() and int(label) < n:
                matches = [int(label)]
            if not matches:
                raise ConfigError(f"classifier {self.path}: no label {label!r} (labels: "
                                  f"{', '.join(id2label.values())})")
            self.index = matches[0]
        self.label = id2label.get(self.index, str(self.index))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

    def scores(self, texts: list[str]) -> list[float]:
        """P(label) for each text (softmax over labels; sigmoid for single-logit or multi-label heads)."""
        import torch

        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], truncation=True, max_length=self.max_length,
                                   padding=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                logits = self.model(**batch).logits.float()
            probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
            out.extend(probs[:, self.index].tolist())
        return out


__all__ = ["SequenceClassifier"]
