"""``score()``: a registry model over a dataset, with the device's own runtime, resumably, on one engine.

Order of work: check the options, the model version (and its artifact's sha256), and the whole
input; decide whether the output is already done, resumable or refused; only then score the
missing partitions (``local`` or ``ray``) while merging them in order into the output, and
optionally build a feature set from it (``publish_features``). Every refusal before scoring is an ``InputError`` or
``RegistryError``; nothing is written.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_batch.errors import InputError, RegistryError
from cloud_batch.features.build import BuildResult, build, check_set, check_version
from cloud_batch.progress import Reporter
from cloud_batch.registry.models import Registry
from cloud_batch.score import parts
from cloud_batch.score.inputs import InputOptions, repeated_keys
from cloud_batch.score.readers import open_input
from cloud_batch.score.worker import TOP_CLASS, ScorerSpec, is_classifier, output_columns
from edge_agent.inference.interpreter import runtime_label
from edge_agent.inference.modelpack import sha256_file

ENGINES = ("local", "ray")
DEFAULT_BATCH = 256
PARTITIONS = 16  # default: the input in about this many partitions ...
PARTITION_ROWS = (256, 65536)  # ... of at least / at most this many rows


@dataclass
class ScoreResult:
    """What ``score`` did."""

    output: Path
    rows: int
    parts: int
    skipped_parts: int
    engine: str
    seconds: float
    model: str
    version: str
    sha256: str
    input_fingerprint: str
    key: str
    undecodable: list[str] = field(default_factory=list)
    published: BuildResult | None = None
    worker_cpu_s: float | None = None  # CPU seconds of the local engine's workers (model load included)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        done = self.parts - self.skipped_parts
        lines = [
            f"scored {self.rows:,} rows with {self.model} {self.version} ({self.engine}) -> {self.output}",
            f"  {done} of {self.parts} partitions scored now"
            + (f", {self.skipped_parts} already written" if self.skipped_parts else "")
            + (f", {self.rows_per_s:,.0f} rows/s" if done else ""),
        ]
        if self.undecodable:
            shown = ", ".join(self.undecodable[:10]) + (" ..." if len(self.undecodable) > 10 else "")
            lines.append(f"  left out {len(self.undecodable)} undecodable images: {shown}")
        if self.published is not None:
            lines.append("  " + self.published.summary().replace("\n", "\n  "))
        return "\n".join(lines)


def parse_map(items: Sequence[str]) -> dict[str, list[str]]:
    """``["live=t,v,p,r", ...]`` (``--map``) to ``{"live": ["t", "v", "p", "r"]}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, cols = item.partition("=")
        columns = [c.strip() for c in cols.split(",") if c.strip()]
        if not sep or not name.strip() or not columns:
            raise InputError(f"--map {item!r}: expected INPUT=COL1,COL2,...")
        if name.strip() in out:
            raise InputError(f"--map names input {name.strip()!r} twice")
        out[name.strip()] = columns
    return out


def default_partition_rows(n: int) -> int:
    """About ``PARTITIONS`` partitions of whole default batches, within ``PARTITION_ROWS``.

    It depends on the input only, so reruns agree. Whole batches: a partition's last, partial batch
    resizes the interpreter twice (to it and back) and runs int8 kernels at an odd size.
    """
    low, high = PARTITION_ROWS
    return max(low, min(high, math.ceil(n / PARTITIONS / DEFAULT_BATCH) * DEFAULT_BATCH))


def _check_options(
    engine: str, workers: int | None, batch_size: int, partition_rows: int, output: Path, publish: str | None,
    features_version: str | None, ray_address: str | None,
) -> int:  # fmt: skip
    if engine not in ENGINES:
        raise InputError(f"engine {engine!r} is not one of {list(ENGINES)}")
    if ray_address and engine != "ray":
        raise InputError("--ray-address needs --engine ray")
    for what, value in (("workers", workers), ("batch size", batch_size), ("partition rows", partition_rows)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{what} must be a whole number >= 1, not {value!r}")
    if output.suffix.lower() not in (".parquet", ".pq"):
        raise InputError(f"--output {output}: give a Parquet file name ending in .parquet")
    if (publish is None) != (features_version is None):
        raise InputError("--publish-features SET needs --features-version V (and the other way round)")
    if publish is not None and features_version is not None:
        check_set(publish)
        check_version(features_version, "--features-version")
    return workers or os.cpu_count() or 1


def score(
    registry_dir: str | Path,
    model: str,
    version: str,
    input_path: str | Path,
    output_path: str | Path,
    *,
    engine: str = "local",
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    ray_address: str | None = None,
    entity_key: str | None = None,
    mapping: Mapping[str, Sequence[str]] | None = None,
    features: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    partition_rows: int | None = None,
    publish_features: str | None = None,
    features_version: str | None = None,
    progress: bool = True,
    on_part: Callable[[int, int], None] | None = None,
) -> ScoreResult:
    """Score ``input_path`` with ``model`` ``version`` from the registry into the Parquet file ``output_path``.

    ``on_part(parts done, rows done)`` is called after each partition is written. See the module
    docstring for the order of checks; the CLI is ``cloud-batch score``.
    """
    output = Path(output_path)
    n_workers = _check_options(
        engine, workers, batch_size, partition_rows or 1, output, publish_features, features_version, ray_address
    )
    runtime = runtime_label()  # EDGEFLEET_RUNTIME__BACKEND: refused here, not in every worker
    registry = Registry(registry_dir)
    if model not in registry.names():
        raise RegistryError(
            f"model {model!r} is not in the registry {registry.root} (models: {registry.names() or 'none'})"
        )
    version_dir = registry.path(model, version)
    manifest = registry.manifest(model, version)
    artifact = version_dir / manifest.file
    if not artifact.is_file() or sha256_file(artifact) != manifest.sha256:
        raise RegistryError(f"{artifact} is missing or does not match its manifest's sha256")
    scratch = parts.scratch_dir(output)
    shutil.rmtree(scratch, ignore_errors=True)  # rows a killed run had converted
    options = InputOptions(Path(registry_dir), entity_key, dict(mapping or {}), features, strict, scratch, progress)
    if engine == "local":
        from cloud_batch.score.local import warm_up

        warm_up()  # the worker runtime loads in the background while the input is read and checked
    with closing(open_input(input_path, manifest, options)) as rows:  # its scratch rows go when scoring ends
        part_rows = partition_rows or default_partition_rows(rows.n)
        if publish_features is not None and (repeats := repeated_keys(rows.keys)):
            raise InputError(
                f"--publish-features needs one row per {rows.key_name!r} (a feature set has one row per entity), "
                f"but {repeats} keys repeat"
            )
        identity: dict[str, Any] = {
            "model": model, "version": version, "artifact_sha256": manifest.sha256, "input": rows.kind,
            "input_fingerprint": rows.fingerprint, "key": rows.key_name, "map": {k: list(v) for k, v in options.mapping.items()},
            "strict": strict, "left_out": rows.skipped, "partition_rows": part_rows, "runtime": runtime, **rows.identity,
        }  # fmt: skip
        n_parts = math.ceil(rows.n / part_rows)
        result = ScoreResult(
            output, rows.n, n_parts, n_parts, engine, 0.0, model, version, manifest.sha256, rows.fingerprint,
            rows.key_name, rows.skipped,
        )  # fmt: skip
        reporter = Reporter(progress)
        if rows.skipped:
            reporter.status(f"leaving out {len(rows.skipped)} undecodable images: {', '.join(rows.skipped[:10])}")
        if parts.output_is_done(output, identity, overwrite):
            shutil.rmtree(parts.staging_dir(output), ignore_errors=True)
        else:
            bounds = [(p * part_rows, min(rows.n, (p + 1) * part_rows)) for p in range(n_parts)]
            done = parts.open_staging(output, identity, overwrite, [b - a for a, b in bounds])
            tasks = [(p, rows.chunk(*bounds[p])) for p in range(n_parts) if p not in done]
            result.skipped_parts = len(done)
            spec = ScorerSpec(str(version_dir), batch_size, rows.key_name, str(parts.staging_dir(output)), runtime)
            meta = {
                "identity": identity, "engine": engine, "model": model, "version": version,
                "artifact_sha256": manifest.sha256, "input_fingerprint": rows.fingerprint, "rows": rows.n,
                "columns": [rows.key_name, *output_columns(manifest)],
            }  # fmt: skip
            merger = parts.Merger(output, n_parts, meta, [TOP_CLASS] if is_classifier(manifest) else [])

            def after_part(part: int, parts_done: int, rows_done: int) -> None:
                if on_part is not None:
                    on_part(parts_done, rows_done)
                merger.advance(part)  # the merge overlaps the scoring

            t0 = time.perf_counter()
            try:
                merger.advance()  # partitions a killed run left
                result.worker_cpu_s = _run(engine, spec, tasks, n_workers, ray_address, reporter, after_part, len(done))
                merger.finish()
            finally:
                merger.close()
            result.seconds = time.perf_counter() - t0
        if publish_features is not None and features_version is not None:
            result.published = build(
                registry_dir,
                publish_features,
                features_version,
                source=output,
                entity_key=rows.key_name,
                progress=progress,
            )
        return result


def _run(
    engine: str, spec: ScorerSpec, tasks: list[Any], workers: int, address: str | None, reporter: Reporter,
    on_part: Callable[[int, int, int], None], already: int,
) -> float | None:  # fmt: skip
    """Run the engine behind a rows/s progress bar; ``on_part(part, parts done, rows done)`` after each
    partition; returns the workers' CPU seconds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = sum(len(chunk.keys) for _, chunk in tasks)
    counts = {"parts": already, "rows": 0}
    cpu = [0.0]
    bar = Progress(
        TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=reporter.console, disable=not reporter.enabled,
        auto_refresh=False,  # refreshed as partitions finish: no refresh thread
    )  # fmt: skip
    task = bar.add_task("scoring", total=total, rate="")
    t0 = time.perf_counter()

    def done(part: int, n: int, cpu_s: float = 0.0) -> None:
        counts["parts"] += 1
        counts["rows"] += n
        cpu[0] += cpu_s
        rate = counts["rows"] / max(1e-9, time.perf_counter() - t0)
        bar.update(task, advance=n, rate=f"{rate:,.0f} rows/s")
        bar.refresh()
        on_part(part, counts["parts"], counts["rows"])

    with bar:
        if engine == "ray":
            from cloud_batch.score.ray_engine import run_ray

            run_ray(spec, tasks, workers, done, address)
            return None
        from cloud_batch.score.local import run_local

        run_local(spec, tasks, workers, done)
        return cpu[0]
