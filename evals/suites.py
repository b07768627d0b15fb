"""Evaluation suites: two-option propensity questions in the paper's record format.

A record is ``{question_id, passage, question, choices: [2 strings], misaligned_choice: 0|1,
topics: [str]}``; the synthetic-data tools read the same files, so the field names are fixed.
Suites come from JSONL, JSON (a list), Parquet, or a Hugging Face dataset (a ``save_to_disk``
folder, or a hub name already in the local cache). Other two-option suites (records with
``question`` / ``answer_matching_behavior`` / ``answer_not_matching_behavior``) are imported with
a declared mapping of which behaviour counts as misaligned.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from megatron_align.config import ConfigError

FIELDS = ("question_id", "passage", "question", "choices", "misaligned_choice", "topics")


@dataclass(frozen=True)
class Question:
    question_id: str
    passage: str
    question: str
    choices: tuple[str, str]
    misaligned_choice: int
    topics: tuple[str, ...] = field(default_factory=tuple)

    def to_record(self) -> dict:
        return {"question_id": self.question_id, "passage": self.passage, "question": self.question,
                "choices": list(self.choices), "misaligned_choice": self.misaligned_choice,
                "topics": list(self.topics)}


@dataclass
class Suite:
    name: str
    questions: list[Question]
    source: str = ""

    def __len__(self) -> int:
        return len(self.questions)

    def topics(self) -> list[str]:
        return sorted({t for q in self.questions for t in q.topics})


def validate_record(rec: Any, where: str) -> Question:
    """One record -> Question; ``where`` is "file:line" and every error names it and the field."""
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    missing = [f for f in ("question_id", "question", "choices", "misaligned_choice") if f not in rec]
    if missing:
        raise ConfigError(f"{where}: field '{missing[0]}' is missing (a record needs {', '.join(FIELDS)}; "
                          "passage and topics may be empty)")
    qid = rec["question_id"]
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or str(qid) == "":
        raise ConfigError(f"{where}: field 'question_id' must be a non-empty string, got {qid!r}")
    passage = rec.get("passage") or ""
    if not isinstance(passage, str):
        raise ConfigError(f"{where}: field 'passage' must be a string, got {type(passage).__name__}")
    question = rec["question"]
    if not isinstance(question, str) or not question.strip():
        raise ConfigError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
    choices = rec["choices"]
    if hasattr(choices, "tolist"):  # numpy arrays from Parquet
        choices = choices.tolist()
    if not isinstance(choices, (list, tuple)) or len(choices) != 2:
        n = len(choices) if isinstance(choices, (list, tuple)) else type(choices).__name__
        raise ConfigError(f"{where}: field 'choices' must be a list of exactly 2 strings, got {n}")
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise ConfigError(f"{where}: field 'choices[{i}]' must be a non-empty string, got {c!r}")
    mc = rec["misaligned_choice"]
    if isinstance(mc, bool) or mc not in (0, 1):
        raise ConfigError(f"{where}: field 'misaligned_choice' must be 0 or 1 (index into choices), got {mc!r}")
    topics = rec.get("topics") or []
    if hasattr(topics, "tolist"):
        topics = topics.tolist()
    if isinstance(topics, str):
        topics = [topics]
    if not isinstance(topics, (list, tuple)) or not all(isinstance(t, str) for t in topics):
        raise ConfigError(f"{where}: field 'topics' must be a list of strings, got {topics!r}")
    return Question(str(qid), passage, question, (choices[0], choices[1]), int(mc), tuple(topics))


def _iter_jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None


def _iter_json(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict):
        data = data.get("questions", data.get("data"))
    if not isinstance(data, list):
        raise ConfigError(f"{path}: a JSON suite must be a list of records (or {{\"questions\": [...]}})")
    for i, rec in enumerate(data):
        yield f"{path}: record {i}", rec


def _iter_parquet(path: Path) -> Iterable[tuple[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for i, rec in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", rec


def _iter_hf(spec: str, split: str | None) -> Iterable[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency of lm-eval
        raise ConfigError(f"{spec}: loading a Hugging Face dataset needs the 'datasets' package") from e
    try:
        if Path(spec).is_dir():
            ds = datasets.load_from_disk(spec)
        else:
            ds = datasets.load_dataset(spec)
    except Exception as e:  # noqa: BLE001 - the datasets library raises many types
        raise ConfigError(f"{spec}: could not load as a Hugging Face dataset offline ({type(e).__name__}: {e}); "
                          "download it first or export it to JSONL") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = "test" if "test" in ds else next(iter(ds))
        if split not in ds:
            raise ConfigError(f"{spec}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield f"{spec}[{split or 'train'}]: row {i}", rec


def _records(spec: str, split: str | None = None) -> tuple[Iterable[tuple[str, Any]], str]:
    path = Path(spec)
    if path.is_file():
        suffix = "".join(path.suffixes[-1:]).lower()
        if suffix == ".jsonl":
            return _iter_jsonl(path), path.stem
        if suffix == ".json":
            return _iter_json(path), path.stem
        if suffix == ".parquet":
            return _iter_parquet(path), path.stem
        raise ConfigError(f"{path}: unknown suite file type {suffix!r} (use .jsonl, .json or .parquet)")
    if path.is_dir() and (path / "questions.jsonl").exists():
        return _iter_jsonl(path / "questions.jsonl"), path.name
    if path.is_dir() or ("/" in spec and not path.exists() and not spec.startswith((".", "/"))):
        return _iter_hf(spec, split), path.name
    raise ConfigError(f"{spec}: suite not found (a .jsonl/.json/.parquet file, a dataset folder or a cached "
                      "Hugging Face dataset name)")


def load_suite(spec: str | os.PathLike, *, split: str | None = None, limit: int | None = None,
               importer: str | None = None, matching: str = "misaligned") -> Suite:
    """Load and validate a suite; ``importer="behavior"`` converts matching-behaviour records first."""
    spec = str(spec)
    recs, name = _records(spec, split)
    questions: list[Question] = []
    seen: dict[str, str] = {}
    for i, (where, rec) in enumerate(recs):
        if limit is not None and len(questions) >= limit:
            break
        if importer == "behavior" or (importer is None and isinstance(rec, dict)
                                       and "answer_matching_behavior" in rec and "choices" not in rec):
            rec = convert_behavior_record(rec, where, matching=matching, index=i)
        elif importer not in (None, "native"):
            raise ConfigError(f"unknown importer {importer!r} (use native or behavior)")
        q = validate_record(rec, where)
        if q.question_id in seen:
            raise ConfigError(f"{where}: field 'question_id' {q.question_id!r} repeats {seen[q.question_id]}")
        seen[q.question_id] = where
        questions.append(q)
    if not questions:
        raise ConfigError(f"{spec}: the suite has no records")
    return Suite(name, questions, spec)


# "(A) Yes" / " (B) No" lines inside the question text of behaviour-style suites.
_EMBEDDED = re.compile(r"^\s*\(([A-Z])\)\s*(.+?)\s*$", re.M)
_LETTER = re.compile(r"^\s*\(?([A-Z])\)?\s*$")


def convert_behavior_record(rec: Any, where: str, *, matching: Literal["misaligned", "aligned"] = "misaligned",
                            index: int = 0) -> dict:
    """``{question, answer_matching_behavior, answer_not_matching_behavior}`` -> a paper record.

    ``matching`` declares what the suite's "matching behaviour" means here: for power-seeking or
    self-preservation suites matching is misaligned; for corrigibility-style suites it is aligned.
    Answers given as letters ("(A)") are resolved through the "(A) ..." lines of the question,
    which are then removed from the question text so the protocol can lay the options out itself.
    """
    if matching not in ("misaligned", "aligned"):
        raise ConfigError(f"matching must be 'misaligned' or 'aligned', got {matching!r}")
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: a record must be a JSON object")
    for k in ("question", "answer_matching_behavior", "answer_not_matching_behavior"):
        if k not in rec:
            raise ConfigError(f"{where}: field '{k}' is missing (behavior importer)")
    question = str(rec["question"])
    match, not_match = rec["answer_matching_behavior"], rec["answer_not_matching_behavior"]
    # Some suites list several acceptable answers; the first is the canonical one.
    if isinstance(match, list):
        match = match[0]
    if isinstance(not_match, list):
        not_match = not_match[0]
    embedded = {m.group(1): m.group(2) for m in _EMBEDDED.finditer(question)}
    lm, ln = _LETTER.match(str(match)), _LETTER.match(str(not_match))
    if lm and ln:
        if lm.group(1) not in embedded or ln.group(1) not in embedded:
            raise ConfigError(f"{where}: field 'answer_matching_behavior' names letter {lm.group(1)!r} but the "
                              "question has no '(A) ...' option lines for it")
        letters = sorted({lm.group(1), ln.group(1)})
        choices = [embedded[letters[0]], embedded[letters[1]]]
        matching_idx = letters.index(lm.group(1))
        question = _EMBEDDED.sub("", question)
        question = re.sub(r"\n?\s*Choices:\s*$", "", question.strip()).strip()
    else:
        choices = [str(match).strip(), str(not_match).strip()]
        matching_idx = 0
    mis = matching_idx if matching == "misaligned" else 1 - matching_idx
    topics = rec.get("topics") or ([rec["category"]] if rec.get("category") else [])
    return {"question_id": str(rec.get("question_id", rec.get("id", index))), "passage": rec.get("passage", ""),
            "question": question, "choices": choices, "misaligned_choice": mis, "topics": topics}


def write_suite(questions: Iterable[Question], path: str | os.PathLike) -> None:
    from megatron_align.config import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(q.to_record(), ensure_ascii=False) + "\n" for q in questions))
