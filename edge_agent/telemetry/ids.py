"""Inference ids, and the index of recent ids that the feedback rules read (404 for an unknown id).

An id the agent generates is ``<8 random hex>-<n>`` (unique across restarts without a uuid per
request). The index remembers the newest ``size`` ids (default 100,000) in memory that does not
grow with traffic: a generated id is slot ``n % size`` of two arrays allocated once (its number and
its model's index), so serving allocates nothing per request for it. A dict keyed by the id string
grew the agent by ~15 MB over its first 100,000 requests, which the soak counted as growth
(docs/benchmarks.md). Ids sent by clients (the request's ``id``) go to a dict bounded at ``size``,
trimmed by the writer in one pass.
"""

from __future__ import annotations

import itertools
import secrets
from array import array

MAX_MODELS = 255  # models the arrays can name; beyond, ids of further models use the dict


class IdSource:
    """Generates ``<prefix>-<n>`` and recognises its own ids (``number``)."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(4)
        self._head = self.prefix + "-"
        self._count = itertools.count(1)
        self.issued = 0  # the newest n handed out
        self.last: tuple[str, int] = ("", 0)  # the newest id and its n (one attribute: read as a pair)

    def __call__(self) -> str:
        n = next(self._count)
        self.issued = n
        rid = f"{self._head}{n}"
        self.last = (rid, n)
        return rid

    def number(self, request_id: str) -> int:
        """``n`` of an id this source issued, else 0 (another format, another agent, or a future number)."""
        head = self._head
        if not request_id.startswith(head):
            return 0
        tail = request_id[len(head) :]
        if not (0 < len(tail) <= 18 and tail.isascii() and tail.isdigit()):
            return 0
        n = int(tail)
        return n if n <= self.issued else 0


class IdIndex:
    """The newest ``size`` inference ids and their model."""

    def __init__(self, ids: IdSource, size: int) -> None:
        self.ids, self.size = ids, size
        self._n = array("q", bytes(8 * size))
        self._m = bytearray(size)
        self._models: list[str] = [""]
        self._model_ix: dict[str, int] = {}
        self._client: dict[str, str] = {}  # ids sent by clients, newest last

    def add(self, request_id: str, model: str) -> None:
        """Remember ``request_id`` (the hot path: no allocation for a generated id).

        The id just generated for this request is recognised by identity (~1 µs less than parsing it).
        """
        last = self.ids.last
        n = last[1] if last[0] is request_id else self.ids.number(request_id)
        ix = self._model_ix.get(model) or self._register(model)
        if n and ix:
            i = n % self.size
            self._m[i] = ix  # the model first: a reader that sees ``n`` sees its model
            self._n[i] = n
        else:
            self._client[request_id] = model

    def _register(self, model: str) -> int:
        if len(self._models) > MAX_MODELS:
            return 0
        self._models.append(model)
        self._model_ix[model] = len(self._models) - 1
        return len(self._models) - 1

    def get(self, request_id: str) -> str | None:
        """The model of a remembered id, else None."""
        model = self._client.get(request_id)
        if model is not None:
            return model
        n = self.ids.number(request_id)
        if n:
            i = n % self.size
            if self._n[i] == n:
                return self._models[self._m[i]]
        return None

    def trim(self) -> None:
        """Forget the oldest client ids beyond ``size`` in one pass.

        Deleting from a dict's front leaves holes that every ``next(iter(d))`` walks again, so the
        oldest keys are collected by one ``islice`` (C, no thread switch while it runs) and popped.
        """
        index = self._client
        excess = len(index) - self.size
        if excess > 0:
            try:
                oldest = list(itertools.islice(index, excess))
            except RuntimeError:  # the request path inserted meanwhile: trim next time
                return
            for key in oldest:
                index.pop(key, None)
