"""``edge-agent features …``: thin commands over the feature cache (``<data-dir>/features.db``).

``cli.main.build_parser`` calls ``add_commands(sub)``; the shared helpers come from ``cli.common``,
so this module never imports ``cli.main``.
Errors raised on purpose (unknown set/entity, expired value, rejected bundle) reach ``cli.main``,
which prints ``error: ...`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.cli.common import Handler, add_command, common_args, config_from_args
from edge_agent.errors import FeatureExpired, FeatureNotFound, FeatureSetNotFound
from edge_agent.features.cache import DB_FILE, FeatureCache
from edge_agent.features.records import FeatureRow

Common = Callable[[argparse.ArgumentParser], None]


def _cache(args: argparse.Namespace, *, must_exist: bool = False) -> FeatureCache:
    cfg = config_from_args(args)
    path = Path(cfg.data_dir) / DB_FILE
    if must_exist and not path.is_file():
        raise FeatureSetNotFound(f"no feature cache at {path} (apply a bundle first: `edge-agent features apply DIR`)")
    fc = cfg.features
    return FeatureCache(path, max_rows=fc.max_rows, max_bytes=fc.max_bytes, synchronous=fc.synchronous)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = abs(seconds)
    text = (
        f"{s:.0f}s"
        if s < 120
        else f"{s / 60:.0f}m"
        if s < 7200
        else f"{s / 3600:.1f}h"
        if s < 172800
        else f"{s / 86400:.1f}d"
    )
    return ("-" if seconds < 0 else "") + text


# -- commands -------------------------------------------------------------------------
def cmd_features_get(args: argparse.Namespace) -> int:
    with _cache(args, must_exist=True) as cache:
        row: FeatureRow | None = cache.get(args.set, args.entity)
    if row is None:
        raise FeatureNotFound(f"feature set {args.set!r} has no entity {args.entity!r}")
    if args.json:
        _print_json(row.to_dict())  # printed for an expired row too, so scripts can see its age
    else:
        ttl = "no ttl" if row.meta.ttl_s is None else f"ttl {_age(row.meta.ttl_s)}"
        state = "EXPIRED" if row.expired else "fresh"
        print(
            f"{row.set} {row.entity}: version {row.version} (row v{row.row_version}), age {_age(row.age_s)}, "
            f"{ttl}: {state}"
        )
        width = max(len(n) for n in row.names)
        for name, value in row.as_dict().items():
            print(f"  {name:<{width}}  {value:.6g}")
    if row.expired:
        raise FeatureExpired(
            f"feature set {args.set!r} entity {args.entity!r} expired: age {row.age_s:.0f}s > ttl "
            f"{row.meta.ttl_s:g}s (version {row.version}, stale_policy {row.meta.stale_policy})",
            row,
        )
    return 0


def cmd_features_list(args: argparse.Namespace) -> int:
    try:
        with _cache(args, must_exist=True) as cache:
            sets = cache.list_sets()
    except FeatureSetNotFound:
        sets = []
    if args.json:
        _print_json([s.to_dict() for s in sets])
        return 0
    if not sets:
        print("no feature sets cached")
        return 0
    print(f"{'SET':<20} {'VERSION':<9} {'KIND':<9} {'ROWS':>9} {'NEWEST':>8} {'OLDEST':>8} {'TTL':>7}  STATUS")
    for s in sets:
        status = (
            "all expired" if s.all_expired else "some expired" if s.some_expired else "fresh" if s.rows else "empty"
        )
        print(
            f"{s.name:<20} {s.version:<9} {s.kind:<9} {s.rows:>9} {_age(s.newest_age_s):>8} "
            f"{_age(s.oldest_age_s):>8} {_age(s.ttl_s):>7}  {status}"
        )
    return 0


def cmd_features_apply(args: argparse.Namespace) -> int:
    with _cache(args) as cache:
        res = cache.apply(args.dir, allow_downgrade=args.allow_downgrade)
    if res.noop:
        print(f"{res.set} version {res.version} is already applied ({res.rows} rows)")
    else:
        print(
            f"applied {res.set} version {res.version} ({res.kind}, was {res.previous_version or 'none'}): "
            f"{res.rows} rows, {res.upserted} upserted, {res.deleted} deleted in {res.seconds:.2f}s"
        )
    return 0


# -- parser -----------------------------------------------------------------------------
def add_commands(sub: Any, common: Common | None = None) -> argparse.ArgumentParser:
    """Add ``features get|list|apply`` to the top-level subparsers; return the ``features`` parser."""
    common = common or common_args
    group = add_command(
        sub, "features", lambda a: 2, "read and update the on-device feature cache",
        "edge-agent features list --data-dir ./var/agent",
    )  # fmt: skip
    fsub = group.add_subparsers(dest="features_command", required=True, metavar="SUBCOMMAND")
    specs: dict[str, tuple[Handler, str, str]] = {
        "get": (
            cmd_features_get,
            "print one entity's cached features (exit 1 when the entity is unknown or its value expired)",
            "edge-agent features get maintenance pump-17 --json",
        ),
        "list": (
            cmd_features_list,
            "list cached feature sets: version, rows, freshness, ttl",
            "edge-agent features list --json --data-dir ./var/agent",
        ),
        "apply": (
            cmd_features_apply,
            "apply a local feature bundle directory (snapshot or delta) to the cache, atomically",
            "edge-agent features apply ./bundles/maintenance-42 --data-dir ./var/agent",
        ),
    }
    get, lst, apply = (add_command(fsub, name, *spec) for name, spec in specs.items())
    get.add_argument("set", help="feature set name")
    get.add_argument("entity", help="entity id (e.g. an asset_id)")
    for p in (get, lst):
        p.add_argument("--json", action="store_true", help="machine-readable output")
    apply.add_argument("dir", type=Path, metavar="DIR", help="bundle directory (bundle.json + data.npz)")
    apply.add_argument("--allow-downgrade", action="store_true", help="accept an older snapshot (rollback)")
    for p in (get, lst, apply):
        common(p)
    return group
