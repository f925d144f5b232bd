"""What a training job hands back: where the model went and how good it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.wire.model.manifest import Manifest


@dataclass
class TrainResult:
    """A registered model version with its evaluation numbers and report location."""

    manifest: Manifest
    path: Path  # the version directory in the registry
    eval_dir: Path  # eval.json and eval.png
    metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """A few human-readable lines for the CLI."""
        m = self.manifest
        lines = [f"registered {m.name} version {m.version} -> {self.path} ({m.size} bytes, sha256 {m.sha256[:12]}…)"]
        lines += [f"  {k}: {v}" for k, v in self.metrics.items() if isinstance(v, (int, float, str))]
        lines.append(f"  report: {self.eval_dir}")
        return "\n".join(lines)
