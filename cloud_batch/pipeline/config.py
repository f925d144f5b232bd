"""``pipeline.toml``: what one nightly run of one model does, validated before anything runs.

Every key has a default except ``[pipeline] model`` and ``fleet``; unknown sections or keys, wrong
types and out-of-range values are InputErrors that name the key. Relative paths are resolved
against the directory of the TOML file, so a scheduled run does not depend on its working dir.

```toml
[pipeline]
model = "maintenance"          # digits | maintenance
fleet = "plant-7"
runs_dir = "runs"              # runs/<model>/<as-of>/<step>/
registry = "registry"          # model + feature registry, signed-document record
store = "telemetry"            # the ingest store (Parquet)
broker = "mqtt://broker:1883"  # ingest and release; "" = no broker (ingest and release skip)

[ingest]    idle_exit_s = 2.0
[dataset]   min_labeled_rows = 50, holdout_fraction = 0.25, min_minority_fraction = 0.05
[features]  build = [{ set = "asset_features", recipe = "maintenance", history = "history.parquet" }], score = []
[train]     epochs = 20, seed = 0, n_assets = 200, days = 60, batch_size = 64
[gates]     max_quantization_drop = 0.01, max_regression = 0.01, max_ece = 0.05,
            max_ece_regression = 0.0, latency_budget_ms = 5.0
[release]   key = "keys/signing.key", stages = [5, 25, 100], window = "02:00-04:00",
            max_failure_rate = 0.1, health_window_s = 30.0, max_latency_ms = 0.0
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_batch.errors import InputError
from cloud_batch.fleetops.release import build_policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODELS = ("digits", "maintenance")


@dataclass(frozen=True)
class IngestSection:
    """``[ingest]``: how long the drain waits for the next message before it stops."""

    idle_exit_s: float = 2.0


@dataclass(frozen=True)
class DatasetSection:
    """``[dataset]``: the holdout share and the data checks' thresholds.

    A check that fails stops the run at the dataset step, with the threshold and the figure that missed it.
    """

    min_labeled_rows: int = 50
    holdout_fraction: float = 0.25
    min_minority_fraction: float = 0.05


@dataclass(frozen=True)
class FeaturesSection:
    """``[features]``: feature sets to rebuild and batch-scoring jobs to run before training."""

    build: list[dict[str, Any]] = field(default_factory=list)  # keyword arguments of features.build.build
    score: list[dict[str, Any]] = field(default_factory=list)  # batch-scoring jobs (#9)


@dataclass(frozen=True)
class TrainSection:
    """``[train]``: the fit, and the size of the simulated base history (maintenance).

    A run's model must be reproducible from its config: the seed fixes the split, the init and the shuffling.
    """

    epochs: int = 20
    seed: int = 0
    n_assets: int = 200
    days: int = 60
    batch_size: int = 64


@dataclass(frozen=True)
class GatesSection:
    """``[gates]``: every threshold a candidate must meet to be registered and released."""

    max_quantization_drop: float = 0.01
    max_regression: float = 0.01
    max_ece: float = 0.05
    max_ece_regression: float = 0.0  # ECE may exceed production's by this much (0: no worse)
    latency_budget_ms: float = 5.0


@dataclass(frozen=True)
class ReleaseSection:
    """``[release]``: the signing key and the rollout policy of the model release."""

    key: str = "keys/signing.key"
    stages: list[int] = field(default_factory=lambda: [100])
    window: str = ""
    max_failure_rate: float = 0.1
    health_window_s: float = 30.0
    max_latency_ms: float = 0.0  # devices roll back when p50 latency in the health window exceeds it (0: no limit)


@dataclass(frozen=True)
class PipelineConfig:
    """The validated ``pipeline.toml``; paths are absolute."""

    model: str
    fleet: str
    runs_dir: Path
    registry: Path
    store: Path
    broker: str
    ingest: IngestSection
    dataset: DatasetSection
    features: FeaturesSection
    train: TrainSection
    gates: GatesSection
    release: ReleaseSection
    source: Path | None = None

    def run_dir(self, as_of: str) -> Path:
        return self.runs_dir / self.model / as_of

    def key_path(self) -> Path:
        return self.path(self.release.key)

    def path(self, value: str | Path) -> Path:
        base = self.source.parent if self.source is not None else Path.cwd()
        return (base / Path(value)).resolve()

    def fingerprint(self) -> str:
        """A short hash of every setting (not the file's location): step markers record it."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


_SECTIONS: dict[str, type] = {
    "ingest": IngestSection,
    "dataset": DatasetSection,
    "features": FeaturesSection,
    "train": TrainSection,
    "gates": GatesSection,
    "release": ReleaseSection,
}
_TOP = {"model": "", "fleet": "", "runs_dir": "runs", "registry": "registry", "store": "telemetry", "broker": ""}
_POSITIVE = {"epochs", "n_assets", "days", "batch_size", "min_labeled_rows", "latency_budget_ms"}
_FRACTIONS = {"holdout_fraction", "min_minority_fraction", "max_failure_rate", "max_ece"}
_NON_NEGATIVE = {
    "idle_exit_s",
    "max_quantization_drop",
    "max_regression",
    "max_ece_regression",
    "health_window_s",
    "max_latency_ms",
    "seed",
}


def _typed(where: str, value: Any, kind: Any) -> Any:
    """``value`` checked against a field type (int, float, str, list[int], list[dict])."""
    origin = getattr(kind, "__origin__", None)
    if origin is list:
        (item,) = kind.__args__
        item_type = getattr(item, "__origin__", item)
        if not isinstance(value, list) or not all(isinstance(v, item_type) and not isinstance(v, bool) for v in value):
            raise InputError(f"{where} must be a list of {getattr(item_type, '__name__', item_type)}")
        return list(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(f"{where} must be {'a number' if kind is float else f'an {kind.__name__}'}, got {value!r}")
    return value


def _range(where: str, key: str, value: Any) -> None:
    if key in _POSITIVE and not value > 0:
        raise InputError(f"{where} must be positive, got {value!r}")
    if key in _FRACTIONS and not 0 <= value <= 1:
        raise InputError(f"{where} must be between 0 and 1, got {value!r}")
    if key in _NON_NEGATIVE and value < 0:
        raise InputError(f"{where} must not be negative, got {value!r}")


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise InputError(f"[{name}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InputError(f"[{name}] has unknown key(s) {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        values[key] = _typed(f"[{name}] {key}", value, hints[key])
        _range(f"[{name}] {key}", key, values[key])
    return cls(**values)


def _keywords(fn: Any, drop: set[str]) -> set[str]:
    """The keyword-only parameters of ``fn`` a config may set (the pipeline sets ``drop`` itself)."""
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY} - drop


def _check_entries(what: str, entries: list[dict[str, Any]], named: tuple[str, ...], known: set[str]) -> None:
    """Each ``[features] what`` entry has its ``named`` keys (non-empty strings) and only ``known`` others."""
    for i, entry in enumerate(entries):
        where = f"[features] {what}[{i}]"
        unknown = sorted(set(entry) - known - set(named))
        if unknown:
            raise InputError(f"{where} has unknown key(s) {unknown}; known: {sorted(known | set(named))}")
        missing = [k for k in named if not (isinstance(entry.get(k), str) and entry[k])]
        if missing:
            raise InputError(f"{where} needs {', '.join(repr(k) for k in named)} (strings); missing {missing}")


def check_features(section: FeaturesSection) -> None:
    """``[features]`` entries against the keywords of ``features.build.build`` and ``score.job.score``.

    Checked at load, so a mistyped key is a config error before the night's work rather than a
    TypeError in the features step. ``version``/``output`` are optional (default: the next
    version, the step's directory).
    """
    from cloud_batch.features.build import build
    from cloud_batch.score.job import score

    _check_entries("build", section.build, ("set",), _keywords(build, {"progress", "now"}) | {"version"})
    scoring = _keywords(score, {"progress", "on_part"}) | {"output"}
    _check_entries("score", section.score, ("model", "version", "input"), scoring)


def parse_config(raw: dict[str, Any], source: Path | None = None) -> PipelineConfig:
    """Validate a parsed TOML document (InputError naming the bad key) into a PipelineConfig."""
    unknown = sorted(set(raw) - {"pipeline", *_SECTIONS})
    if unknown:
        raise InputError(f"unknown section(s) {unknown}; known: {['pipeline', *_SECTIONS]}")
    top = raw.get("pipeline")
    if not isinstance(top, dict):
        raise InputError("missing [pipeline] table (model, fleet, ...)")
    extra = sorted(set(top) - set(_TOP))
    if extra:
        raise InputError(f"[pipeline] has unknown key(s) {extra}; known: {sorted(_TOP)}")
    values = {k: _typed(f"[pipeline] {k}", top.get(k, default), str) for k, default in _TOP.items()}
    if values["model"] not in MODELS:
        raise InputError(f"[pipeline] model must be one of {list(MODELS)}, got {values['model']!r}")
    from edge_agent.errors import EdgeError
    from edge_agent.wire.names import check_segment

    try:
        check_segment(values["fleet"], "fleet")
    except EdgeError as exc:
        raise InputError(f"[pipeline] fleet: {exc}") from exc
    sections = {name: _section(name, cls, raw.get(name, {})) for name, cls in _SECTIONS.items()}
    check_features(sections["features"])
    rel = sections["release"]
    try:  # the release's own rule, checked now rather than after a night of training
        build_policy(
            stages=rel.stages,
            max_failure_rate=rel.max_failure_rate,
            max_latency_ms=rel.max_latency_ms or None,
            window=rel.window or None,
            urgent=False,
            health_window_s=rel.health_window_s,
        )
    except InputError as exc:
        raise InputError(f"[release] {exc}") from exc
    config = PipelineConfig(
        model=values["model"],
        fleet=values["fleet"],
        runs_dir=Path(),
        registry=Path(),
        store=Path(),
        broker=values["broker"],
        source=source,
        **sections,
    )
    return dataclasses.replace(
        config,
        runs_dir=config.path(values["runs_dir"]),
        registry=config.path(values["registry"]),
        store=config.path(values["store"]),
    )


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate ``pipeline.toml`` (InputError for a missing file, bad TOML or a bad key)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read pipeline config {p}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{p} is not valid TOML: {exc}") from exc
    return parse_config(raw, p.resolve())
