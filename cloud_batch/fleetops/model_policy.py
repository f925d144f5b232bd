"""The model-aware part of a release policy: shadow mode with its promotion rules, ``breaking``, health signals.

``model_policy`` turns the release command's choices into the ``Policy`` fields they set,
checked by the rules the devices apply (``edge_agent.wire.shadow``), so a bad value is an
InputError before anything is signed or published.
"""

from __future__ import annotations

from typing import Any

from cloud_batch.errors import InputError, input_errors
from edge_agent.wire.policy import Policy
from edge_agent.wire.shadow import check_policy, parse_promote_if


def model_policy(
    *,
    shadow: bool = False,
    shadow_rate: float | None = None,
    shadow_min_samples: int | None = None,
    shadow_window_s: float | None = None,
    promote_if: str | None = None,
    breaking: bool = False,
    max_latency_ratio: float | None = None,
    max_output_psi: float | None = None,
) -> dict[str, Any]:
    """The Policy fields for these choices (only those that differ from the defaults); InputError if bad."""
    shadow_only: dict[str, object] = {"--shadow-rate": shadow_rate, "--shadow-min-samples": shadow_min_samples}
    shadow_only |= {"--shadow-window-s": shadow_window_s, "--promote-if": promote_if}
    given = [flag for flag, value in shadow_only.items() if value is not None]
    if given and not shadow:
        raise InputError(f"{', '.join(given)} only apply to a shadow release (add --shadow)")
    out: dict[str, Any] = {"mode": "shadow"} if shadow else {}
    fields = {"shadow_rate": shadow_rate, "shadow_min_samples": shadow_min_samples, "shadow_window_s": shadow_window_s}
    fields |= {"max_latency_ratio": max_latency_ratio, "max_output_psi": max_output_psi}
    out |= {k: v for k, v in fields.items() if v is not None}
    if breaking:
        out["breaking"] = True
    with input_errors():
        if promote_if is not None:
            out |= parse_promote_if(promote_if)
        check_policy(Policy(**out))
    return out
