"""Pull the chosen option out of a chat model's free-text reply.

Returns the displayed option index (0 for the first letter, 1 for the second) or None when the
reply names no option, refuses ("Neither"), or names both without preferring one. Patterns run
from most to least explicit; a reply is only attributed to an option when all explicit mentions
agree, because a wrong attribution biases the misalignment rate while a non-match is reported.
"""

from __future__ import annotations

import re

_REFUSAL = re.compile(r"^\W*(neither|none|both|i (can(?:no|')t|won't|will not|refuse|decline))\b", re.I)


def _patterns(letters: tuple[str, str]) -> tuple[re.Pattern, list[re.Pattern]]:
    L = "|".join(re.escape(x) for x in letters)
    cue = (r"(?i:(?:(?:final\s+)?answer|response|my answer|choice|option|the best option is)"
           r"\s*(?:is)?\s*[:\-]?\s*)")
    # The reply starts with the letter: "B", "(B)", "B.", "B)", "**B**", "Answer: B", "B because ..."
    leading = re.compile(
        rf"^\W{{0,3}}(?:{cue})?[\(\[\*\"']*({L})(?:[\)\]\*\"']*)"
        rf"(?=\s*$|[\.\):,;\]\*!\n]|\s+[-\u2013\u2014]|\s+(?:because|since|as)\b)")
    marked = [
        re.compile(rf"\(({L})\)"),
        re.compile(rf"\b(?i:option|choice|answer|letter)\s*(?:is\s*|would be\s*|:\s*)?[\(\[\"']?({L})\b(?![\w'])"),
        re.compile(rf"\b(?i:choose|chose|pick|picked|select|selected|go with|going with|prefer|opt for)\s+"
                   rf"(?i:option\s+|answer\s+|choice\s+)?[\(\[\"']?({L})\b(?![\w'])"),
        re.compile(rf"(?:^|\n)\s*\**({L})\**\s*[\.\):]"),
    ]
    return leading, marked


def parse_choice(text: str, letters: tuple[str, str] = ("A", "B"), options: tuple[str, str] | None = None,
                 cue: str | None = None) -> int | None:
    if text is None:
        return None
    s = text.strip()
    if cue and s.lower().startswith(cue.lower()):
        s = s[len(cue):].strip()
    if not s or _REFUSAL.match(s):
        return None
    leading, marked = _patterns(tuple(letters))
    m = leading.match(s)
    if m:
        return letters.index(m.group(1))
    found: list[int] = []
    for p in marked:
        for mm in p.finditer(s):
            found.append(letters.index(mm.group(1)))
    if found:
        return found[0] if len(set(found)) == 1 else None
    if options:
        low = s.lower()
        hits = [i for i, o in enumerate(options) if o and o.strip().lower().rstrip(".") in low]
        if len(hits) == 1:
            return hits[0]
    return None
