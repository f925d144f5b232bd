"""The V2 model repository extension: list, load (activate a version) and unload models.

::

    POST /v2/repository/index                  [{"name", "version", "state", "reason"}] for every installed version
    POST /v2/repository/models/{m}/load        {"parameters": {"version": "2"}}: activate through the store's
                                               atomic pointer, then hot-swap; no version: serve the active one again
    POST /v2/repository/models/{m}/unload      stop serving ``m`` (until load, or the agent restarts)

These are local control: refused with 403 unless the agent listens on loopback or a unix socket, or
``allow_repository_control = true`` (:func:`control_allowed`). tritonclient's ``load_model`` has no
version argument; it may name one in its ``config`` the Triton way,
``{"version_policy": {"specific": {"versions": [2]}}}``. Uploading model files is refused (400):
versions are installed by ``edge-agent models install`` or a signed release.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any

from edge_agent.errors import (
    ControlRefused,
    EdgeError,
    ManifestError,
    MethodNotAllowedError,
    NotFoundError,
    RequestError,
)
from edge_agent.http.asgi import Receive, Scope, Send, read_body, send_error, send_response
from edge_agent.jsonlimits import loads_limited
from edge_agent.models.serving import ModelServer
from edge_agent.wire import kserve_v2 as v2

PREFIX = "/v2/repository/"
MAX_BODY_BYTES = 64 * 1024  # a control request is a few bytes; model files are not accepted

READY, UNAVAILABLE = "READY", "UNAVAILABLE"


def control_allowed(listen: str, allow: bool) -> bool:
    """Repository control is on for a unix socket or a loopback listener, or when ``allow`` says so."""
    if allow or listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    doc = loads_limited(raw, max_depth=8, what="repository request", error=RequestError)
    if not isinstance(doc, dict):
        raise RequestError("repository request: expected a JSON object")
    return doc


def requested_version(raw: bytes) -> str | None:
    """The version a load request names: ``parameters.version``, or one in Triton's ``config`` version policy."""
    params = _body(raw).get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("parameters: expected a JSON object")
    files = [k for k in params if k.startswith("file:")]
    if files:
        raise RequestError(
            f"model files cannot be uploaded ({files[0]}); install versions with `edge-agent models install` "
            "or a signed release"
        )
    version = params.get("version")
    if version is None and params.get("config"):
        try:
            config = json.loads(params["config"]) if isinstance(params["config"], str) else params["config"]
            versions = config.get("version_policy", {}).get("specific", {}).get("versions")
        except (ValueError, AttributeError):
            raise RequestError("parameters.config: expected a JSON model config object") from None
        if versions is not None:
            if not isinstance(versions, list) or len(versions) != 1:
                raise RequestError("version_policy.specific.versions: one version serves at a time; name exactly one")
            version = versions[0]
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, (str, int)):
        raise RequestError(f"parameters.version: expected a version string, got {version!r}")
    return str(version)


class Repository:
    """The extension's three calls on a :class:`ModelServer` and its store (blocking: run in a thread)."""

    def __init__(self, server: ModelServer, allowed: bool) -> None:
        self.server = server
        self.allowed = allowed

    def check_allowed(self) -> None:
        if not self.allowed:
            raise ControlRefused(
                "repository control is refused on this listener: listen on loopback or a unix socket, "
                "or set allow_repository_control = true"
            )

    def index(self, raw: bytes) -> list[dict[str, Any]]:
        """Every installed version with its state (``{"ready": true}``: only the serving ones)."""
        self.check_allowed()
        ready_only = _body(raw).get("ready") is True
        server, store = self.server, self.server.store
        loaded, errors = server.loaded(), server.errors()
        rows = []
        for name in store.names():
            serving = loaded.get(name)
            for version in store.versions(name):
                if serving is not None and serving.version == version:
                    rows.append({"name": name, "version": version, "state": READY, "reason": ""})
                    continue
                err = errors.get(name)
                if err is not None and err.version == version:
                    reason = f"failed to load: {err.reason}"
                elif name in server.unloaded():
                    reason = "unloaded"
                else:
                    reason = "installed, not active"
                rows.append({"name": name, "version": version, "state": UNAVAILABLE, "reason": reason})
        return [r for r in rows if r["state"] == READY] if ready_only else rows

    def load(self, name: str, raw: bytes) -> None:
        """Activate the requested version (or the active one) and wait until it serves; the old one keeps
        serving and the pointer is put back when the new version fails to load."""
        self.check_allowed()
        version = requested_version(raw)
        store = self.server.store
        if name not in store.names():
            raise NotFoundError(f"unknown model {name!r}")
        previous = store.active(name)
        if version is not None:
            try:
                store.activate(name, version)  # the atomic pointer (NotFoundError when not installed)
            except ManifestError as exc:
                raise RequestError(str(exc)) from None
        self.server.load(name)
        serving = self.server.loaded().get(name)
        wanted = version or previous
        if serving is None or serving.version != wanted:
            err = self.server.errors().get(name)
            if previous is not None and previous != wanted:
                store.activate(name, previous)
            reason = err.reason if err is not None else "not loaded"
            raise RequestError(f"model {name!r} version {wanted!r} failed to load: {reason}")

    def unload(self, name: str, raw: bytes) -> None:
        """Stop serving ``name``."""
        self.check_allowed()
        _body(raw)  # tritonclient sends {"parameters": {"unload_dependents": ...}}: nothing depends on a model here
        try:
            known = name in self.server.store.names()
        except EdgeError:
            known = False
        if not known:
            raise NotFoundError(f"unknown model {name!r}")
        self.server.unload(name)


async def handle(
    scope: Scope, receive: Receive, send: Send, repo: Repository, in_thread: Callable[..., Awaitable[Any]]
) -> None:
    """Route one request under ``/v2/repository/``; the store and the hot swap run in a worker thread."""
    path: str = scope["path"]
    parts = path[len(PREFIX) :].split("/")
    try:
        if parts == ["index"]:
            call: Callable[..., Any] = repo.index
            args: tuple[str, ...] = ()
        elif len(parts) == 3 and parts[0] == "models" and parts[1] and parts[2] in ("load", "unload"):
            call = repo.load if parts[2] == "load" else repo.unload
            args = (parts[1],)
        else:
            raise NotFoundError(f"no route for {scope['method']} {path}")
        if scope["method"] != "POST":
            raise MethodNotAllowedError(scope["method"], path, "POST")
        repo.check_allowed()
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        body = await read_body(receive, length, MAX_BODY_BYTES)
        result = await in_thread(call, *args, body)
        await send_response(send, 200, v2.dumps(result if result is not None else {}))
    except Exception as exc:
        await send_error(send, exc, scope)
