"""The V2 model metadata document: of the serving version, or of any installed version (read from the store).

Apart from the routes because it is the one read-only view that reaches past the serving
model into the store and the feature cache.
"""

from __future__ import annotations

from typing import Any

from edge_agent.errors import FailedError, ManifestError, NotFoundError, NotReadyError
from edge_agent.features.cache import FeatureCache
from edge_agent.features.join import ENTITIES_PARAM, ENTITY_PARAM
from edge_agent.inference.runtime import LoadedModel
from edge_agent.models.serving import ModelServer
from edge_agent.wire.model.calibration import calibration_of
from edge_agent.wire.model.manifest import Manifest, TensorSpec
from edge_agent.wire.names import check_name, parse_version


def _tensor_meta(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _tensor_params(spec: TensorSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"native_datatype": spec.native_datatype}
    if spec.quantization is not None:
        out["quantization"] = spec.quantization.to_dict()
    return out


def _manifest_of(
    server: ModelServer, name: str, version: str | None, loaded: LoadedModel | None, installed: list[str]
) -> Manifest:
    """The manifest asked for: the serving one when it matches, else the store's (404/503 when there is none)."""
    if loaded is not None and (version is None or version == loaded.version):
        return loaded.manifest
    store = server.store
    if version is None:
        version = store.active(name)
        if version is None:
            if not server.synced_once:
                raise NotReadyError("not ready: the agent is still loading its models")
            raise NotFoundError(f"unknown model {name!r}")
    elif version not in installed:
        raise NotFoundError(f"model {name!r} has no version {version!r}" if installed else f"unknown model {name!r}")
    return store.manifest(name, version)  # a corrupt manifest on disk is a server fault: 500


def model_metadata(
    server: ModelServer, features: FeatureCache | None, name: str, version: str | None
) -> dict[str, Any]:
    """``GET /v2/models/{name}[/versions/{v}]``."""
    try:
        check_name(name)
        if version is not None:
            parse_version(version)
    except ManifestError:  # not a valid model name or version: nothing can exist by that name
        raise NotFoundError(f"unknown model {name!r}" + (f" version {version!r}" if version else "")) from None
    loaded = server.loaded().get(name)
    installed = server.store.versions(name)
    manifest = _manifest_of(server, name, version, loaded, installed)
    serving = loaded is not None and loaded.version == manifest.version
    params: dict[str, Any] = {
        "version": manifest.version,
        "active_version": loaded.version if loaded is not None else None,
        "ready": serving,
        "inputs": {s.name: _tensor_params(s) for s in manifest.inputs},
        "outputs": {s.name: _tensor_params(s) for s in manifest.outputs},
        "labels": manifest.labels,
        "preprocessing": manifest.preprocessing,
        "sha256": manifest.sha256,
        "created_at": manifest.created_at,
        "calibration": calibration_of(manifest.metrics),  # temperature + ECE (cloud_batch.pipeline), or None
    }
    if loaded is not None and serving:
        params["runtime"] = loaded.info()
    if manifest.feature_joins:
        params["feature_joins"] = joins_metadata(features, manifest)
        for name_in, j in manifest.feature_joins.items():
            params["inputs"][name_in]["joined_from"] = j.set
    if manifest.precomputed is not None:  # answered from this feature set first (features/precomputed.py)
        params["precomputed"] = manifest.precomputed.to_dict()
    return {
        "name": manifest.name,
        "versions": installed,
        "platform": "tflite",
        "inputs": [_tensor_meta(s) for s in manifest.inputs],
        "outputs": [_tensor_meta(s) for s in manifest.outputs],
        "parameters": params,
    }


def joins_metadata(features: FeatureCache | None, manifest: Manifest) -> dict[str, Any]:
    """Which inputs the feature cache fills, from which set, and the set version cached now."""
    out = {}
    for name_in, j in manifest.feature_joins.items():
        try:
            cached = features.version(j.set) if features is not None else None
        except FailedError:
            cached = None
        out[name_in] = {**j.to_dict(), "cached_version": cached, "entity_parameters": [ENTITY_PARAM, ENTITIES_PARAM]}
    return out
