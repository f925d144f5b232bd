"""The V2 statistics extension: ``GET /v2/models[/{m}[/versions/{v}]]/stats`` in Triton's JSON shape.

``{"model_stats": [$model_stat, ...]}``, each with ``inference_stats`` (success, fail, queue,
compute_input, compute_infer, compute_output, and cache_hit/cache_miss always zero: no response cache
here), ``batch_stats`` per executed batch size, ``inference_count`` and ``execution_count``. The
counters are ``inference.stats.InferenceStats``, the same ones the ``nv_*`` metrics read.

All models: every version that served traffic or serves now. One model: all its installed versions
(zeros where none ran). 404 for an unknown model or version.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from edge_agent.errors import EdgeError, MethodNotAllowedError, NotFoundError
from edge_agent.http.asgi import Scope, Send, send_error, send_response
from edge_agent.inference.stats import InferenceStats
from edge_agent.models.serving import ModelServer
from edge_agent.wire import kserve_v2 as v2

PREFIX, SUFFIX = "/v2/models/", "/stats"


def _installed(server: ModelServer, name: str) -> list[str]:
    try:
        return server.store.versions(name)
    except EdgeError:  # not a valid model name: nothing installed under it
        return []


def model_stats(stats: InferenceStats, server: ModelServer, name: str | None, version: str | None) -> dict[str, Any]:
    """The response document (blocking: reads the store's version list)."""
    if name is None:
        known = {n: [m.version] for n, m in server.loaded().items()}
        return {"model_stats": [s.to_dict() for s in stats.snapshot(known)]}
    installed = _installed(server, name)
    rows = [s for s in stats.snapshot({name: installed}) if s.name == name]
    if not rows:
        raise NotFoundError(f"unknown model {name!r}")
    if version is not None:
        rows = [s for s in rows if s.version == version]
        if not rows:
            raise NotFoundError(f"model {name!r} has no version {version!r}")
    return {"model_stats": [s.to_dict() for s in rows]}


def is_stats_path(path: str) -> bool:
    """``/v2/models[/{m}[/versions/{v}]]/stats`` (a model named "stats" has no metadata route, as in Triton)."""
    return path.startswith(PREFIX) and path.endswith(SUFFIX)


async def handle(
    scope: Scope, send: Send, stats: InferenceStats, server: ModelServer, in_thread: Callable[..., Awaitable[Any]]
) -> None:
    """Route one statistics request."""
    path: str = scope["path"]
    rest = path[len(PREFIX) :]
    parts = [] if rest == SUFFIX[1:] else rest[: -len(SUFFIX)].split("/")
    try:
        if (parts and not all(parts)) or len(parts) not in (0, 1, 3) or (len(parts) == 3 and parts[1] != "versions"):
            raise NotFoundError(f"no route for {scope['method']} {path}")
        if scope["method"] not in ("GET", "HEAD"):
            raise MethodNotAllowedError(scope["method"], path, "GET, HEAD")
        name = parts[0] if parts else None
        version = parts[2] if len(parts) == 3 else None
        doc = await in_thread(model_stats, stats, server, name, version)
        await send_response(send, 200, v2.dumps(doc))
    except Exception as exc:
        await send_error(send, exc, scope)
