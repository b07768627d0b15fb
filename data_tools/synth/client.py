"""OpenAI-compatible chat-completions client (vLLM, SGLang, llama.cpp server, transformers serve,
OpenAI): timeouts, retries with exponential backoff on 429 / 5xx / connection errors, a request
budget, and an append-only on-disk response cache keyed by the request body.

The cache is a JSONL file written one fsync'ed line per response, the moment the response arrives:
a job killed at any point loses at most the requests in flight, and a rerun sends only requests
whose responses are not in the cache, so no answered request is ever paid for twice.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import httpx

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RequestError(RuntimeError):
    """A request failed for good (non-retryable status, or retries used up)."""


class BudgetExhausted(RuntimeError):
    """The request budget is spent; the rest of the jobs stay pending for a later run."""


class ResponseCache:
    """``key -> response`` on disk; thread-safe appends, tolerant of a torn last line."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "responses.jsonl"
        self._lock = threading.Lock()
        self._data: dict[str, dict] = {}
        self.torn_lines = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                for raw in f:
                    try:
                        rec = json.loads(raw)
                        self._data[rec["key"]] = rec["response"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        # Only a kill in the middle of a write leaves a partial line.
                        self.torn_lines += 1
        self._f = open(self.path, "ab")
        if self.torn_lines:
            self._f.write(b"\n")  # start the next record on a fresh line

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> dict | None:
        return self._data.get(key)

    def put(self, key: str, response: dict, request: dict | None = None) -> None:
        line = json.dumps({"key": key, "time": time.time(), "request": request, "response": response},
                          ensure_ascii=False).encode("utf-8") + b"\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
            self._data[key] = response

    def close(self) -> None:
        with self._lock:
            self._f.close()


class RequestBudget:
    """At most ``limit`` HTTP requests (retries included); None = unlimited."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.limit is not None and self.used >= self.limit:
                raise BudgetExhausted(f"request budget of {self.limit} spent")
            self.used += 1


class ChatClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 120.0, max_retries: int = 6,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0, budget: RequestBudget | None = None,
                 concurrency: int = 8):
        self.url = base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=min(30.0, timeout_s)),
                                 limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.budget = budget or RequestBudget(None)
        self.stats = {"requests": 0, "retries": 0, "errors": 0, "status": {}}
        self._lock = threading.Lock()

    def _count(self, key: str, status: int | str | None = None) -> None:
        with self._lock:
            self.stats[key] += 1
            if status is not None:
                s = self.stats["status"]
                s[str(status)] = s.get(str(status), 0) + 1

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_base_s * (2 ** attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        delay = min(self.backoff_max_s, delay) * (0.5 + random.random() / 2)  # jitter spreads retries
        time.sleep(delay)

    def complete(self, payload: dict) -> dict:
        last = ""
        for attempt in range(self.max_retries + 1):
            self.budget.take()
            self._count("requests")
            if attempt:
                self._count("retries")
            retry_after = None
            try:
                r = self.http.post(self.url, json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                self._count("errors", type(e).__name__)
                last = f"{type(e).__name__}: {e}"
            else:
                with self._lock:
                    s = self.stats["status"]
                    s[str(r.status_code)] = s.get(str(r.status_code), 0) + 1
                if r.status_code == 200:
                    try:
                        data = r.json()
                        data["choices"][0]["message"]
                        return data
                    except (ValueError, KeyError, IndexError, TypeError):
                        last = f"malformed response: {r.text[:200]!r}"
                        self._count("errors")
                elif r.status_code in RETRY_STATUS or r.status_code >= 500:
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                    retry_after = r.headers.get("retry-after")
                else:
                    self._count("errors")
                    raise RequestError(f"{self.url}: HTTP {r.status_code}: {r.text[:500]} (not retried; check the "
                                       "model name, API key and request parameters)")
            if attempt < self.max_retries:
                self._sleep(attempt, retry_after)
        raise RequestError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last}")

    def close(self) -> None:
        self.http.close()


__all__ = ["ChatClient", "ResponseCache", "RequestBudget", "RequestError", "BudgetExhausted", "RETRY_STATUS"]
