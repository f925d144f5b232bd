"""The API's OpenAPI 3 description, served at ``GET /v2/openapi.json``; ``docs/openapi.yaml`` is its rendering.

Kept as data in Python so the agent needs no YAML parser; ``python -m edge_agent.http.openapi``
prints the YAML form, and ``tests/test_openapi.py`` fails when ``docs/openapi.yaml`` is stale.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from edge_agent import __version__

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_OBJ = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _ERROR for c in codes}


def _get(summary: str, *codes: int, ok: dict[str, Any] = _OBJ) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": ok, **_errors(*codes)}}}


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32"]},
        "data": {"type": "array"},
        "parameters": {"type": "object"},
    },
}
_INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "inputs": {"type": "array", "items": _TENSOR},
                    "outputs": {
                        "type": "array",
                        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
                    },
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "entity_id": {"type": "string"},
                            "entity_ids": {"type": "array", "items": {"type": "string"}},
                            "binary_data_output": {"type": "boolean"},
                        },
                    },
                },
            }
        }
    },
}


def _infer(params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Run inference (JSON tensors; binary tensor data with Inference-Header-Content-Length)",
            "parameters": params,
            "requestBody": _INFER_BODY,
            "responses": {"200": _OBJ, **_errors(400, 404, 409, 413, 415, 503)},
        }
    }


_LABEL = {"description": "class index, class name or value", "oneOf": [{"type": "integer"}, {"type": "number"}, {"type": "string"}]}  # fmt: skip
_FEEDBACK_ITEM = {
    "type": "object",
    "required": ["id", "label"],
    "additionalProperties": False,
    "properties": {"id": {"type": "string", "minLength": 1}, "label": _LABEL, "replace": {"type": "boolean"}},
}
_FEEDBACK = {
    "post": {
        "summary": "A true label for an inference id (committed before 200; 404 unknown id, 409 labelled unless replace)",
        "parameters": [_NAME],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            _FEEDBACK_ITEM,
                            {
                                "type": "object",
                                "required": ["items"],
                                "additionalProperties": False,
                                "properties": {"items": {"type": "array", "minItems": 1, "items": _FEEDBACK_ITEM}},
                            },
                        ]
                    }
                }
            },
        },
        "responses": {"200": _OBJ, **_errors(400, 404, 409, 413, 503)},
    }
}


def _repository(summary: str, params: list[dict[str, Any]], *codes: int, array: bool = False) -> dict[str, Any]:
    """A repository extension call (403 unless local control is allowed: docs/api.md)."""
    version = {"type": "object", "properties": {"version": {"type": "string"}, "config": {"type": "string"}}}
    ok = {
        "description": "ok",
        "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}},
    }
    return {
        "post": {
            "summary": summary,
            "parameters": params,
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": {"type": "object", "properties": {"parameters": version}}}},
            },
            "responses": {"200": ok if array else _OBJ, **_errors(400, 403, 413, *codes)},
        }
    }


SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "edgefleet agent: KServe V2 (Open Inference Protocol) REST API",
        "version": __version__,
        "description": 'Every error is JSON {"error": "..."}; see docs/api.md for limits and status codes.',
    },
    "paths": {
        "/v2/health/live": _get("The process serves HTTP"),
        "/v2/health/ready": _get("The initial model sync finished", 503),
        "/v2": _get("Server metadata"),
        "/v2/openapi.json": _get("This document"),
        "/agent/status": _get("The agent's status document"),
        "/metrics": _get(
            "Prometheus metrics", ok={"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}}
        ),
        "/v2/models/{name}": {**_get("Model metadata", 404, 503), "parameters": [_NAME]},
        "/v2/models/{name}/ready": {**_get("Model readiness", 404, 503), "parameters": [_NAME]},
        "/v2/models/{name}/versions/{version}": {
            **_get("Model version metadata", 404, 503),
            "parameters": [_NAME, _VERSION],
        },
        "/v2/models/{name}/versions/{version}/ready": {
            **_get("Model version readiness", 404, 503),
            "parameters": [_NAME, _VERSION],
        },
        "/v2/models/{name}/infer": _infer([_NAME]),
        "/v2/models/{name}/versions/{version}/infer": _infer([_NAME, _VERSION]),
        "/v2/models/{name}/feedback": _FEEDBACK,
        "/v2/models/stats": _get("Statistics of the serving model versions (Triton's statistics extension)"),
        "/v2/models/{name}/stats": {**_get("Statistics of a model's installed versions", 404), "parameters": [_NAME]},
        "/v2/models/{name}/versions/{version}/stats": {
            **_get("Statistics of one model version", 404),
            "parameters": [_NAME, _VERSION],
        },
        "/v2/repository/index": _repository("Installed models and versions with their state", [], array=True),
        "/v2/repository/models/{name}/load": _repository(
            "Activate parameters.version (the store's atomic pointer, then the hot swap), or serve again", [_NAME], 404
        ),
        "/v2/repository/models/{name}/unload": _repository("Stop serving a model until it is loaded", [_NAME], 404),
        "/agent/streams": _get("Camera streams and their status (fps, drops, last error)"),
        "/agent/streams/{id}/latest": {
            **_get("A stream's newest result and its frame's age", 404, 503),
            "parameters": [_ID],
        },
        "/agent/streams/{id}/events": {
            **_get(
                "A stream's results as Server-Sent Events (event: result)",
                404,
                ok={"description": "ok", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            ),
            "parameters": [_ID],
        },
    },
    "components": {
        "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}
    },
}


@functools.cache
def openapi_json() -> bytes:
    """The document as compact JSON bytes (built once)."""
    return json.dumps(SPEC, separators=(",", ":")).encode()


def to_yaml() -> str:
    """The YAML rendering written to ``docs/openapi.yaml`` (needs PyYAML, a test/dev dependency)."""
    import yaml  # type: ignore[import-untyped]

    header = "# Generated by `python -m edge_agent.http.openapi > docs/openapi.yaml`; served at GET /v2/openapi.json.\n"

    class Plain(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # shared sub-documents written out, not as &anchors
            return True

    return header + yaml.dump(SPEC, Dumper=Plain, sort_keys=False, width=110)


if __name__ == "__main__":
    print(to_yaml(), end="")
