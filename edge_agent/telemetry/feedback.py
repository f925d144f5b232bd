"""Feedback labels: the request body, the label rule per model, and the commit before the 200.

``POST /v2/models/{name}/feedback`` and ``edge-agent feedback`` both end in :func:`submit`::

    {"id": "<inference id>", "label": 3}                      one label
    {"items": [{"id": "...", "label": "cat", "replace": true}, ...]}   several, all or nothing

The label rule: a model whose manifest has ``labels`` takes a class index or one of those names;
a model whose first output has a last axis above 1 takes a class index below it; any other model
(a regressor) takes a finite number. Booleans are never labels.

Errors: malformed body or wrong label type → RequestError (400); an id that is neither recent
nor in the outbox, or belongs to another model → InferenceNotFound (404); a second label for an
id without ``"replace": true`` → FeedbackConflict (409). Nothing is written unless every item passes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import FeedbackConflict, InferenceNotFound, RequestError
from edge_agent.telemetry.outbox import Outbox, Row
from edge_agent.telemetry.recorder import ModelPolicy, Recorder
from edge_agent.wire.kserve_v2 import dumps
from edge_agent.wire.model.manifest import Manifest

MAX_ITEMS = 1000
MAX_ID_LEN = 256


@dataclass(frozen=True)
class FeedbackItem:
    request_id: str
    label: Any
    replace: bool = False


def parse_feedback(doc: Any) -> list[FeedbackItem]:
    """The items of a feedback body; RequestError naming the field when it is malformed."""
    if not isinstance(doc, dict):
        raise RequestError('feedback body must be a JSON object: {"id": ..., "label": ...} or {"items": [...]}')
    if "items" in doc:
        raw = doc["items"]
        if set(doc) - {"items"}:
            raise RequestError("feedback: give 'items' alone, or 'id' and 'label' without 'items'")
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ITEMS:
            raise RequestError(f"feedback 'items' must be a list of 1 to {MAX_ITEMS} objects")
        return [_item(r, f"items[{i}]") for i, r in enumerate(raw)]
    return [_item(doc, "feedback")]


def _item(raw: Any, where: str) -> FeedbackItem:
    if not isinstance(raw, dict):
        raise RequestError(f"{where} must be an object with 'id' and 'label'")
    unknown = set(raw) - {"id", "label", "replace"}
    if unknown:
        raise RequestError(f"{where}: unknown field(s) {sorted(unknown)}; use id, label, replace")
    rid, replace = raw.get("id"), raw.get("replace", False)
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_LEN:
        raise RequestError(f"{where}.id must be the inference id (a non-empty string of at most {MAX_ID_LEN})")
    if "label" not in raw:
        raise RequestError(f"{where}.label is missing")
    if not isinstance(replace, bool):
        raise RequestError(f"{where}.replace must be true or false")
    return FeedbackItem(rid, raw["label"], replace)


def check_label(manifest: Manifest, label: Any) -> dict[str, Any]:
    """The stored form of ``label`` for this model (``{"label": ...}``, plus ``label_name`` for a named class)."""
    if isinstance(label, bool) or label is None:
        raise RequestError(f"label {label!r} is not a class index, class name or number")
    names = manifest.labels
    classes = len(names) if names else _classes(manifest)
    if classes > 1:
        if isinstance(label, str) and names and label in names:
            return {"label": names.index(label), "label_name": label}
        if isinstance(label, int) and 0 <= label < classes:
            return {"label": label, "label_name": names[label]} if names else {"label": label}
        expected = f"a class index 0..{classes - 1}" + (" or one of its label names" if names else "")
        raise RequestError(f"label {label!r} does not fit model {manifest.name}: expected {expected}")
    if isinstance(label, int | float) and math.isfinite(label):
        return {"label": label}
    raise RequestError(f"label {label!r} does not fit model {manifest.name}: expected a finite number")


def _classes(manifest: Manifest) -> int:
    if not manifest.outputs:
        return 0
    shape = manifest.outputs[0].shape
    return int(shape[-1]) if shape and shape[-1] and shape[-1] > 0 else 0


def submit(recorder: Recorder, manifest: Manifest, items: list[FeedbackItem]) -> list[dict[str, Any]]:
    """Validate every item, then commit them all (and everything queued) before returning."""
    checked = []
    seen: set[str] = set()
    for item in items:
        value = check_label(manifest, item.label)
        model = recorder.known(item.request_id)
        if model != manifest.name:
            raise InferenceNotFound(
                f"no recent inference {item.request_id!r} of model {manifest.name} (unknown, or already uploaded)"
            )
        if item.request_id in seen:
            raise RequestError(f"feedback names id {item.request_id!r} twice")
        seen.add(item.request_id)
        checked.append((item, value))
    with recorder.lock:
        for item, _ in checked:
            if not item.replace and recorder.outbox.has_label(item.request_id):
                raise FeedbackConflict(f'inference {item.request_id!r} already has a label; send "replace": true')
        now = time.time()
        rows = []
        for item, value in checked:
            body = {"model": manifest.name, "request_id": item.request_id, **value}
            if item.replace:
                body["replace"] = True
            rows.append(Row("feedback", now, dumps(body).decode(), model=manifest.name, request_id=None))
        recorder.flush(extra=rows, labels=[(item.request_id, manifest.name) for item, _ in checked])
    return [{"id": item.request_id, **value} for item, value in checked]


def parse_cli_label(text: str) -> Any:
    """A label typed in a shell: a JSON number when it is one (``3``, ``0.7``), else the text (a class name)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, int | float) and not isinstance(value, bool) else text


def submit_to_outbox(
    db_path: str | Path, manifest: Manifest, request_id: str, label: Any, replace: bool = False
) -> dict[str, Any]:
    """One label from outside the agent (``edge-agent feedback``): the same rules, committed to the outbox file.

    Only predictions already committed to the outbox are found here (the agent's in-memory index is
    not visible to another process), so a label for a prediction younger than ``flush_interval_ms`` is 404.
    """
    outbox = Outbox(db_path)
    try:
        recorder = Recorder(outbox, lambda name: ModelPolicy())
        return submit(recorder, manifest, [FeedbackItem(request_id, label, replace)])[0]
    finally:
        outbox.close()
