"""Blocklist terms (YAML) and the matcher that finds them.

Exact semantics: one regular expression over all terms, shaped as a character trie (a flat
alternation of hundreds of terms makes the engine try each term at each position), case-insensitive
(documents are lower-cased) and whole-word (``(?<!\w)...(?!\w)``); :meth:`Matcher.decide_exact`
scans a document with it.

Speed: :meth:`Matcher.decide` first runs a multi-pattern prefilter (Hyperscan where installed,
else pyahocorasick) over an ASCII-folded copy of the document, in which every exact hit shows up
as its folded words. Most documents stop there. For the rest, the exact pattern is tried only at
the offsets where the prefilter saw a term begin (ASCII documents), or over the whole text.
``decide`` and ``decide_exact`` give the same answers (tested); the one known gap is a non-ASCII
letter whose lower case is ASCII (the Kelvin sign), which the fold does not map.
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

from megatron_align.config import ConfigError

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: the lists load 10x faster
DEFAULT_BLOCKLIST_DIR = Path(__file__).with_name("blocklist")
KINDS = ("instant", "entity", "negative")
# Spaces and hyphens inside a term match any run of either ("AI safety" == "AI-safety").
_SEP = "\x00"
_SEP_RE = r"[\s\-]+"
_SPLIT = re.compile(r"[\s\-]+")
_WORD = re.compile(r"\S+")

# Prefilter: ASCII letters and digits kept (lower-cased), every other byte -> space. A term the
# exact pattern matches always shows up in this folded text as its own folded tokens joined by
# single spaces, once runs of spaces are collapsed, so a multi-pattern search there is a superset
# test that runs at C speed.
_STOP = {b"the", b"of", b"to", b"a", b"an", b"in", b"on", b"and", b"or", b"for", b"from", b"by", b"with", b"is",
         b"system", b"model", b"models", b"large", b"language", b"research", b"institute", b"center", b"centre",
         b"human", b"humans", b"world", b"end", b"control", b"data", b"open", b"program", b"term", b"scale",
         b"return", b"out", b"alpha", b"weights", b"power", b"takes", b"take", b"taken", b"character", b"network",
         b"prompt", b"rights", b"future", b"replace", b"now", b"point", b"no", b"up", b"over", b"off", b"free"}
_VERY_COMMON = {b"the", b"of", b"to", b"a", b"an", b"in", b"on", b"and", b"or", b"for", b"from", b"by", b"with",
                b"is", b"no", b"it", b"s", b"i", b"be", b"as", b"at", b"up", b"out", b"over", b"off", b"this", b"that"}
_FOLD = bytes((c + 32 if 65 <= c <= 90 else c) if (c < 128 and chr(c).isalnum()) else 32 for c in range(256))


def term_tokens(term: str) -> tuple[bytes, ...]:
    return tuple(term.encode("utf-8").translate(_FOLD).split())


def normalize_term(term: str) -> str:
    return _SPLIT.sub(" ", term.strip().lower())


@dataclass
class Category:
    name: str
    kind: str
    terms: list[str]
    source: str = ""
    description: str = ""


@dataclass
class Blocklist:
    categories: list[Category]
    # normalized term -> names of the categories it belongs to
    term_categories: dict[str, list[str]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # category -> kind

    def __post_init__(self) -> None:
        for c in self.categories:
            self.kinds[c.name] = c.kind
            for t in c.terms:
                cats = self.term_categories.setdefault(normalize_term(t), [])
                if c.name not in cats:
                    cats.append(c.name)

    @property
    def n_terms(self) -> int:
        return len(self.term_categories)

    def summary(self) -> dict:
        return {c.name: {"kind": c.kind, "terms": len(c.terms), "source": c.source} for c in self.categories}


def load_blocklist(path: str | os.PathLike | None = None) -> Blocklist:
    """Load every ``*.yaml`` of a directory (or one YAML file); see blocklist/README.md."""
    path = Path(path) if path is not None else DEFAULT_BLOCKLIST_DIR
    if path.is_dir():
        files = sorted(list(path.glob("*.yaml")) + list(path.glob("*.yml")))
        if not files:
            raise ConfigError(f"{path}: blocklist directory has no .yaml files")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"{path}: blocklist not found; pass a directory of category YAML files")
    cats: list[Category] = []
    seen: dict[str, str] = {}
    for f in files:
        try:
            data = yaml.load(f.read_text(), Loader=_Loader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{f}{line}: invalid YAML: {getattr(e, 'problem', e)}") from e
        entries = data.get("categories") if isinstance(data, dict) and "categories" in data else [data]
        for i, d in enumerate(entries):
            where = f"{f}" if len(entries) == 1 else f"{f}: categories[{i}]"
            if not isinstance(d, dict):
                raise ConfigError(f"{where}: expected a mapping with category, kind and terms")
            for key in ("category", "kind", "terms"):
                if key not in d:
                    raise ConfigError(f"{where}: required key {key!r} is missing")
            if d["kind"] not in KINDS:
                raise ConfigError(f"{where}: kind: {d['kind']!r} is not one of {list(KINDS)}")
            terms = d["terms"] or []
            for j, t in enumerate(terms):
                if not isinstance(t, str) or not t.strip():
                    raise ConfigError(f"{where}: terms[{j}] is {t!r}, not a non-empty string; quote terms that "
                                      "contain ': ' (YAML reads them as mappings)")
            name = str(d["category"])
            if name in seen:
                raise ConfigError(f"{where}: category {name!r} is also defined in {seen[name]}")
            seen[name] = str(f)
            cats.append(Category(name, d["kind"], list(terms), str(f), str(d.get("description", ""))))
    kinds = {c.kind for c in cats}
    if ("entity" in kinds) != ("negative" in kinds):
        raise ConfigError(f"{path}: two-stage rules need both an 'entity' and a 'negative' category")
    return Blocklist(cats)


def _trie_pattern(terms: Iterable[str]) -> str:
    trie: dict = {}
    for t in terms:
        node = trie
        for ch in _SPLIT.sub(_SEP, t):
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        end = "" in node
        keys = sorted(k for k in node if k)
        if not keys:
            return ""
        alts = []
        singles = []
        for k in keys:
            tail = emit(node[k])
            atom = _SEP_RE if k == _SEP else re.escape(k)
            if tail == "" and k != _SEP and not node[k].keys() - {""}:
                singles.append(k)
            else:
                alts.append(atom + tail)
        if singles:
            alts.append(re.escape(singles[0]) if len(singles) == 1 else
                        "[" + "".join(re.escape(s) for s in singles) + "]")
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if end:
            # A term may stop here, but longer terms are tried first (the engine takes the first
            # alternative that succeeds, and the trailing boundary check backtracks into this).
            body = "(?:" + body + ")?"
        return body

    return emit(trie)


class Matcher:
    """Finds blocklist hits in a document and decides whether it is removed."""

    def __init__(self, blocklist: Blocklist, window: int | None = None, engine: str = "auto"):
        """``engine``: the prefilter's multi-pattern search: ``"hyperscan"`` (x86 Linux, fastest),
        ``"aho-corasick"`` (pyahocorasick, everywhere), ``"none"`` (exact matching only) or
        ``"auto"`` (the first of these that is installed)."""
        self.blocklist = blocklist
        self.window = window
        terms = sorted(blocklist.term_categories)
        self.pattern = re.compile(r"(?<!\w)" + _trie_pattern(terms) + r"(?!\w)")
        self.kind_of_term: dict[str, set[str]] = {
            t: {blocklist.kinds[c] for c in cats} for t, cats in blocklist.term_categories.items()}
        self.stats = {"docs": 0, "exact_checked": 0}
        # Terms without spaces or hyphens ("a.i.", "gpt4", "openai") keep an exact shape when folded,
        # so they are keys as they are. Terms with them ("AI safety", "end of the world") allow any
        # run of separators, so they are found by one of their words and confirmed with a small
        # regex on the folded text.
        table: dict[bytes, tuple[set, list]] = {}
        for t, kinds in self.kind_of_term.items():
            toks = term_tokens(t)
            if not toks:
                raise ConfigError(f"blocklist term {t!r} has no letters or digits; remove it")
            if " " not in t and "-" not in t:
                key = b" " + t.encode("utf-8").translate(_FOLD).strip() + b" "
                table.setdefault(key, (set(), []))[0].update(kinds)
            elif len(toks) == 1:
                table.setdefault(b" " + toks[0] + b" ", (set(), []))[0].update(kinds)
            else:
                word = max(toks, key=lambda k: (k not in _STOP, len(k)))
                rx = re.compile(b" " + b" +".join(re.escape(k) for k in toks) + b"(?= )")
                # The other words must all be present before the (slower) regex is worth running.
                # (words in almost every document are left to the regex: checking them saves nothing)
                # Only the longest other word is checked: enough to skip most regex runs, few extra keys.
                others = tuple(sorted({b" " + k + b" " for k in toks if k not in _VERY_COMMON}
                                      - {b" " + word + b" "}, key=len, reverse=True))[:1]
                table.setdefault(b" " + word + b" ", (set(), []))[1].append((rx, frozenset(kinds), others))
        # Hyperscan reports each key once per document however often it occurs, so the other words
        # of multi-word terms are searched as keys too and checked by id (Aho-Corasick reports every
        # occurrence, so there they are checked with a substring test instead).
        self._n_primary = len(table)
        for d, phrases in list(table.values()):
            for _rx, _k, others in phrases:
                for o in others:
                    table.setdefault(o, (set(), []))
        self._keys = list(table)
        index = {k: i for i, k in enumerate(self._keys)}
        self._values = [(frozenset(d), tuple((rx, k, others, frozenset(index[o] for o in others))
                                             for rx, k, others in ph)) for d, ph in table.values()]
        self._klen = [len(k) for k in self._keys]
        self.engine = self._build_engine(engine)

    def _build_engine(self, engine: str) -> str:
        if engine not in ("auto", "hyperscan", "aho-corasick", "none"):
            raise ConfigError(f"engine: {engine!r} is not one of auto, hyperscan, aho-corasick, none")
        self._hs = self._ac = None
        if engine in ("auto", "hyperscan"):
            try:
                import hyperscan

                db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
                n = len(self._keys)
                # Every occurrence of a whole-term key is needed (it is where an exact match may start);
                # words of multi-word terms only need to be seen once.
                flags = [0 if self._values[i][0] else hyperscan.HS_FLAG_SINGLEMATCH for i in range(n)]
                db.compile(expressions=[re.escape(k) for k in self._keys], ids=list(range(n)), elements=n,
                           flags=flags)
                self._hs = db
                return "hyperscan"
            except ImportError:
                if engine == "hyperscan":
                    raise ConfigError("engine hyperscan: the hyperscan package is not installed "
                                      "(pip install hyperscan; x86-64 only)") from None
        if engine in ("auto", "aho-corasick"):
            try:
                import ahocorasick
            except ImportError:
                if engine == "aho-corasick":
                    raise ConfigError("engine aho-corasick: pip install pyahocorasick") from None
            else:
                auto = ahocorasick.Automaton()
                for i, key in enumerate(self._keys[: self._n_primary]):
                    auto.add_word(key.decode("ascii"), i)
                auto.make_automaton()
                self._ac = auto
                return "aho-corasick"
        if engine == "auto":  # still correct, only slower: every document is matched exactly
            import warnings

            warnings.warn("neither hyperscan nor pyahocorasick is installed: the blocklist filter runs without "
                          "its prefilter (pip install pyahocorasick)", RuntimeWarning, stacklevel=3)
        return "none"

    def _scan(self, folded: bytes) -> tuple[set[int], list[int]]:
        """Keys present in ``folded``, and where whole-term keys start (== the term's offset in the text)."""
        present: set[int] = set()
        starts: list[int] = []
        klen, values = self._klen, self._values
        if self._hs is not None:
            def on_match(i, _from, to, _flags, _ctx):
                present.add(i)
                if values[i][0]:
                    starts.append(to - klen[i])

            self._hs.scan(folded, match_event_handler=on_match)
        else:
            for end, i in self._ac.iter(folded.decode("ascii")):
                present.add(i)
                if values[i][0]:
                    starts.append(end - klen[i] + 1)
        return present, starts

    def _prefilter(self, text: str, encoded: bytes | None):
        """``(could fire, folded text, keys present, whole-term starts, multi-word candidates)``."""
        if encoded is None:
            encoded = text.encode("utf-8", "replace")
        folded = b" " + encoded.translate(_FOLD) + b" "
        present, starts = self._scan(folded)
        hs = self._hs is not None
        kinds: set = set()
        cands = []
        for i in present:
            direct, ph = self._values[i]
            if direct:
                kinds |= direct
            for c in ph:
                # A multi-word term is only possible if its other (rarest) word is there too.
                if (c[3] <= present) if hs else all(o in folded for o in c[2]):
                    cands.append(c)
        possible = "instant" in kinds or ("entity" in kinds and "negative" in kinds)
        if not possible and cands:
            # Confirm multi-word terms only where they could change the answer: most documents
            # hold words like "out" or "take" (from "out of control", "take over") but no entity.
            for want in ("instant", "entity", "negative"):
                if want == "negative" and "entity" not in kinds:
                    break
                for rx, k, _others, _ids in cands:
                    if want in k and not k <= kinds and rx.search(folded):
                        kinds |= k
                        if "instant" in kinds or ("entity" in kinds and "negative" in kinds):
                            possible = True
                            break
                if possible:
                    break
        return possible, folded, starts, cands

    def could_fire(self, text: str, encoded: bytes | None = None) -> bool:
        """Cheap test that is True for every document :meth:`decide_exact` would remove.

        ``encoded``: ``text`` as UTF-8, if the caller already has it.
        """
        if self.engine == "none":
            return True
        return self._prefilter(text, encoded)[0]

    def decide(self, text: str, encoded: bytes | None = None) -> dict | None:
        """Same answer as :meth:`decide_exact`, much faster.

        Documents the prefilter rules out are kept at once. For the rest, if the text is ASCII
        (offsets in the folded text are then offsets in the text), the exact pattern is only tried
        at the places where the prefilter saw a term begin, in order, exactly as ``finditer``
        would meet them; other documents get the full exact scan.
        """
        self.stats["docs"] += 1
        if self.engine == "none":
            self.stats["exact_checked"] += 1
            return self.decide_exact(text)
        possible, folded, starts, cands = self._prefilter(text, encoded)
        if not possible:
            return None
        self.stats["exact_checked"] += 1
        if not text.isascii():
            return self.decide_exact(text)
        where = set(starts)
        for rx, _k, _others, _ids in cands:
            m = rx.search(folded)
            while m is not None:
                where.add(m.start())
                m = rx.search(folded, m.start() + 1)
        low = text.lower()
        hits = []
        pos = 0
        for c in sorted(where):
            if c < pos:
                continue
            m = self.pattern.match(low, c)
            if m is not None:
                t = self._norm(m.group())
                if t in self.kind_of_term:
                    hits.append((c, t))
                pos = m.end()
        return self._decide_from_hits(text, hits)

    @staticmethod
    def _norm(t: str) -> str:
        if " " in t or "-" in t or "\n" in t or "\t" in t or "\r" in t:
            return _SPLIT.sub(" ", t)
        return t

    def hits(self, text: str) -> list[tuple[int, str]]:
        """``(offset, normalized term)`` of every hit, offsets into ``text.lower()``."""
        low = text.lower()
        out = []
        for m in self.pattern.finditer(low):
            t = self._norm(m.group())
            if t in self.kind_of_term:
                out.append((m.start(), t))
        return out

    def decide_exact(self, text: str) -> dict | None:
        """None if the document is kept, else ``{"terms": [...], "categories": [...], "rule": ...}``.

        ``rule`` is ``"instant"`` when an instant term fired, else ``"two_stage"``; ``terms`` lists
        the terms that fired (instant terms, or the entity and negative terms that paired).
        """
        return self._decide_from_hits(text, self.hits(text))

    def _decide_from_hits(self, text: str, hits: list[tuple[int, str]]) -> dict | None:
        if not hits:
            return None
        kinds = self.kind_of_term
        instant = sorted({t for _, t in hits if "instant" in kinds[t]})
        if instant:
            return self._result(instant, "instant")
        ent = [(o, t) for o, t in hits if "entity" in kinds[t]]
        neg = [(o, t) for o, t in hits if "negative" in kinds[t]]
        if not ent or not neg:
            return None
        if self.window is None:
            return self._result(sorted({t for _, t in ent} | {t for _, t in neg}), "two_stage")
        # Word index of each hit, from the start offsets of the document's words.
        starts = [m.start() for m in _WORD.finditer(text.lower())]

        def word_index(off: int) -> int:
            return bisect.bisect_right(starts, off) - 1

        ei = [(word_index(o), t) for o, t in ent]
        ni = [(word_index(o), t) for o, t in neg]
        fired: set[str] = set()
        for a, ta in ei:
            for b, tb in ni:
                if abs(a - b) <= self.window:
                    fired.add(ta)
                    fired.add(tb)
        if not fired:
            return None
        return self._result(sorted(fired), "two_stage")

    def _result(self, terms: list[str], rule: str) -> dict:
        cats: list[str] = []
        for t in terms:
            for c in self.blocklist.term_categories[t]:
                if c not in cats:
                    cats.append(c)
        return {"rule": rule, "terms": terms, "categories": cats}


__all__ = ["Blocklist", "Category", "Matcher", "load_blocklist", "normalize_term", "DEFAULT_BLOCKLIST_DIR"]
