"""Batched continuation log-likelihoods with shared-prefix reuse.

Requests are (context, [continuations]). Tokenisation follows lm-eval's ``_encode_pair`` (trailing
context whitespace moves into the continuation; the continuation is ``enc(ctx+cont)[len(enc(ctx)):]``)
so that our numbers and lm-eval's agree token for token. Two savings over scoring each
(context, continuation) pair on its own:

* single-token continuations that share a context (the option letters) are read from one forward
  pass, at the context's last position;
* requests with the same ``group`` key (the 4 answer-cue variants of one prompt) share their
  longest common token prefix: it is run once, its KV cache is copied to each member, and only the
  few differing tokens are run per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch


@dataclass
class Request:
    context: str
    continuations: Sequence[str]
    group: Hashable = None


@dataclass
class _Row:
    req: int  # request index
    cont: list[int]  # continuation indices this row scores
    tokens: list[int]  # the full input (context + continuation minus its last token)
    targets: list[list[int]]  # per continuation: token ids predicted at the last len() positions


@dataclass
class ContScore:
    logprob: float  # summed log-probability of the continuation tokens
    n_tokens: int
    greedy: bool  # every continuation token is the argmax


def encode_pair(tok, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    bos = [tok.bos_token_id] if add_bos and tok.bos_token_id is not None else []
    whole = bos + tok.encode(context + continuation, add_special_tokens=False)
    ctx = bos + tok.encode(context, add_special_tokens=False)
    return whole[:len(ctx)], whole[len(ctx):]


def _build_rows(tok, requests: Sequence[Request], add_bos: bool) -> list[_Row]:
    rows: list[_Row] = []
    for ri, r in enumerate(requests):
        pairs = [encode_pair(tok, r.context, c, add_bos) for c in r.continuations]
        for ci, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"continuation {r.continuations[ci]!r} is empty after tokenisation")
        singles = [ci for ci, (ctx, cont) in enumerate(pairs) if len(cont) == 1]
        # Single-token continuations over identical context tokens: one row, several targets.
        by_ctx: dict[tuple, list[int]] = {}
        for ci in singles:
            by_ctx.setdefault(tuple(pairs[ci][0]), []).append(ci)
        for ctx, cis in by_ctx.items():
            rows.append(_Row(ri, cis, list(ctx), [pairs[ci][1] for ci in cis]))
        for ci, (ctx, cont) in enumerate(pairs):
            if len(cont) > 1:
                rows.append(_Row(ri, [ci], ctx + cont[:-1], [cont]))
    return rows


def _accepts(model, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def _cache_kwarg(model) -> str:
    # transformers 5.x renamed past_key_values to cache (the old name warns, then goes away).
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


@torch.no_grad()
def score_requests(model, tok, requests: Sequence[Request], *, batch_size: int = 16, add_bos: bool = False,
                   max_length: int | None = None, progress: Callable[[int], None] | None = None,
                   share_prefix: bool = True, method: str = "auto") -> list[list[ContScore]]:
    """Log-likelihood of each continuation of each request, in request order.

    ``batch_size`` counts rows (one row per context for letter scoring). ``progress(n)`` is called
    with the number of requests finished. ``method``: "packed" runs each group as one sequence
    (prefix, then every member's own tokens) under a tree-shaped attention mask; "cache" runs the
    prefix once and copies its KV cache to each member; "auto" packs unless the attention kernel
    cannot take a custom mask (flash attention).
    """
    if method == "auto":
        impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
        method = "cache" if impl.startswith("flash") or impl.startswith("flex") else "packed"
    if method not in ("packed", "cache"):
        raise ValueError(f"method {method!r}: use auto, packed or cache")
    run = _run_batch_packed if method == "packed" else _run_batch
    device = next(model.parameters()).device
    rows = _build_rows(tok, requests, add_bos)
    # Groups: rows whose requests share a group key; ungrouped requests are their own group.
    groups: dict[Hashable, list[int]] = {}
    for i, row in enumerate(rows):
        g = requests[row.req].group
        key = ("g", g) if (g is not None and share_prefix) else ("r", row.req)
        groups.setdefault(key, []).append(i)
    group_list = list(groups.values())
    # Longest inputs first: OOM shows up at once, and similar lengths pad together.
    group_list.sort(key=lambda g: -max(len(rows[i].tokens) for i in g))

    results: list[list[ContScore | None]] = [[None] * len(r.continuations) for r in requests]
    done_rows_per_req = [0] * len(requests)
    rows_per_req = [0] * len(requests)
    for row in rows:
        rows_per_req[row.req] += 1

    # Batch size: "cache" counts rows; "packed" spends the token budget of batch_size unshared rows
    # of the batch's longest prompt, so both batch the same memory as an unshared scorer would.
    if method == "packed":
        def cost(g):
            (p,), _ = _split(rows, [g])
            return p + sum(len(rows[i].tokens) - p for i in g)
    else:
        def cost(g):
            return len(g)

    batch: list[list[int]] = []
    used = budget = 0
    for g in group_list + [None]:
        if g is not None and (not batch or used + cost(g) <= budget):
            if not batch:
                budget = batch_size * (max(len(rows[i].tokens) for i in g) if method == "packed" else 1)
            batch.append(g)
            used += cost(g)
            continue
        if batch:
            run(model, rows, batch, results, device, max_length)
            finished = 0
            for grp in batch:
                for i in grp:
                    r = rows[i].req
                    done_rows_per_req[r] += 1
                    if done_rows_per_req[r] == rows_per_req[r]:
                        finished += 1
            if progress is not None and finished:
                progress(finished)
        batch, used = [], 0
        if g is not None:
            budget = batch_size * (max(len(rows[i].tokens) for i in g) if method == "packed" else 1)
            batch, used = [g], cost(g)
    return results  # type: ignore[return-value]


def _split(rows: list[_Row], batch: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Shared prefix length per group, stopping at least one token before the first scored
    position so that every row keeps a suffix whose logits we read."""
    prefixes, members = [], []
    for g in batch:
        seqs = [rows[i].tokens for i in g]
        p = _common_prefix(seqs) if len(g) > 1 else 0
        min_first = min(len(rows[i].tokens) - len(rows[i].targets[0]) for i in g)
        p = max(0, min(p, min_first))
        p = min(p, min(len(s) for s in seqs) - 1)
        prefixes.append(p)
        members.append(g)
    return prefixes, members


def _collect(rows, i, lg_rows, results) -> None:
    """``lg_rows``: logits at the row's last m positions (m = target length)."""
    row = rows[i]
    lg = torch.log_softmax(lg_rows.float(), dim=-1)
    for ci, tgt in zip(row.cont, row.targets):
        t = torch.tensor(tgt, device=lg.device)
        lp_tok = lg.gather(-1, t[:, None]).squeeze(-1)
        greedy = bool((lg.argmax(-1) == t).all())
        results[row.req][ci] = ContScore(float(lp_tok.sum()), len(tgt), greedy)


def _run_batch_packed(model, rows: list[_Row], batch: list[list[int]], results, device, max_length) -> None:
    # One sequence per group: [prefix][suffix_1][suffix_2]...; suffix tokens see the prefix and
    # their own earlier tokens only, with positions continuing from the prefix. Same numbers as
    # separate sequences, without running the prefix per member or copying a KV cache.
    prefixes, members = _split(rows, batch)
    layouts = []
    for g, p in zip(members, prefixes):
        seq = list(rows[g[0]].tokens[:p])
        spans = []
        for i in g:
            suf = rows[i].tokens[p:]
            spans.append((i, len(seq), len(suf)))
            seq += suf
        layouts.append((seq, p, spans))
    L = max(len(seq) for seq, _, _ in layouts)
    if max_length is not None and L > max_length:
        # The packed row is longer than any single prompt; fall back rather than fail.
        return _run_batch(model, rows, batch, results, device, max_length)
    B = len(layouts)
    ids = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    allow = torch.zeros((B, L, L), dtype=torch.bool)
    causal = torch.ones((L, L), dtype=torch.bool).tril()
    for b, (seq, p, spans) in enumerate(layouts):
        ids[b, :len(seq)] = torch.tensor(seq)
        pos[b, :p] = torch.arange(p)
        allow[b, :p, :p] = causal[:p, :p]
        for _i, start, n in spans:
            pos[b, start:start + n] = p + torch.arange(n)
            allow[b, start:start + n, :p] = True
            allow[b, start:start + n, start:start + n] = causal[:n, :n]
        # Padding queries attend to themselves only, so no softmax row is empty.
        idx = torch.arange(len(seq), L)
        allow[b, idx, idx] = True
    dtype = next(model.parameters()).dtype
    mask = torch.zeros((B, 1, L, L), dtype=dtype)
    mask.masked_fill_(~allow[:, None], torch.finfo(dtype).min)
    # Only a few positions per row are read: project just those onto the vocabulary (for small
    # models with a 50k vocabulary the output layer is most of the compute).
    need = sorted({q for _, _, spans in layouts for i, start, n in spans
                   for q in range(start + n - len(rows[i].targets[0]), start + n)})
    kw = {}
    if _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = torch.tensor(need, device=device)
        col = {q: k for k, q in enumerate(need)}
    else:
        col = {q: q for q in need}
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                use_cache=False, **kw)
    logits = out.logits
    for b, (seq, p, spans) in enumerate(layouts):
        for i, start, n in spans:
            m = len(rows[i].targets[0])
            cols = [col[q] for q in range(start + n - m, start + n)]
            _collect(rows, i, logits[b, cols], results)


def _run_batch(model, rows: list[_Row], batch: list[list[int]], results, device, max_length) -> None:
    prefixes, members = _split(rows, batch)

    pad_id = 0
    use_prefix = any(p > 0 for p in prefixes)
    past = None
    if use_prefix:
        lp = max(prefixes)
        ids = torch.full((len(batch), lp), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), lp), dtype=torch.long)
        for b, (g, p) in enumerate(zip(members, prefixes)):
            if p:
                ids[b, lp - p:] = torch.tensor(rows[g[0]].tokens[:p])
                mask[b, lp - p:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                    use_cache=True)
        past = getattr(out, "cache", None) or out.past_key_values
        sel = torch.tensor([b for b, g in enumerate(members) for _ in g], device=device)
        past.reorder_cache(sel)
        prefix_mask = mask.index_select(0, sel.cpu())
    else:
        lp = 0

    flat = [(i, p) for g, p in zip(members, prefixes) for i in g]
    suffixes = [rows[i].tokens[p:] for i, p in flat]
    ls = max(len(s) for s in suffixes)
    if max_length is not None and lp + ls > max_length:
        raise ValueError(f"a prompt needs {lp + ls} tokens, more than max_length={max_length}")
    ids = torch.full((len(flat), ls), pad_id, dtype=torch.long)
    smask = torch.zeros((len(flat), ls), dtype=torch.long)
    pos = torch.zeros((len(flat), ls), dtype=torch.long)
    for k, ((i, p), s) in enumerate(zip(flat, suffixes)):
        ids[k, :len(s)] = torch.tensor(s)
        smask[k, :len(s)] = 1
        pos[k] = p + torch.arange(ls)
    mask = torch.cat([prefix_mask, smask], dim=1) if past is not None else smask
    kw = {}
    if past is not None:
        kw[_cache_kwarg(model)] = past
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                use_cache=False, **kw)
    logits = out.logits
    for k, ((i, p), s) in enumerate(zip(flat, suffixes)):
        m = len(rows[i].targets[0])
        # Logits at positions len(s)-m .. len(s)-1 predict the m target tokens.
        _collect(rows, i, logits[k, len(s) - m:len(s)], results)
