"""A/B slots of the frozen agent, RAUC-style: unpack into the inactive slot, self-test, switch, confirm or revert.

Layout (``root``: ``/opt/edgefleet/agent`` from the Debian package)::

    slots/a/, slots/b/     one-folder builds (VERSION, SHA256SUMS, edge-agent, _internal/)
    current -> slots/X     what the unit starts (ExecStart)
    good    -> slots/Y     the last confirmed agent; its ``__boot__`` runs before every start (ExecStartPre)

State: ``<data-dir>/agent-update.json`` (temp file + fsync + ``os.replace``), holding ``good``
(slot, version), ``pending`` (version, slot, previous slot, attempts) and ``last`` (the last
result, reported in ``DeviceState``). The one invariant: **without a pending update, ``current``
is ``good``**; every start restores it, so a kill -9 at any step leaves an agent that starts and serves.

``install`` (in the running agent): verify the folder's SHA256SUMS and VERSION, unpack into the
inactive slot (``slots/.tmp-X`` → fsync → rename), run ``<slot>/edge-agent __selftest__``, persist
``pending`` (attempts 0), switch ``current`` (symlink + ``os.replace``), then the agent exits with
``RESTART_EXIT`` so that systemd starts the new slot. ``boot`` (every start, by the good agent):
count the start against a pending update and revert after ``max_starts``; finish an interrupted
switch or revert. ``confirm`` (the new agent, healthy within its window): ``good`` becomes the new
slot. ``revert``: record ``rolled-back`` with the reason, then switch ``current`` back to ``good``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.errors import FailedError, ManifestError, RejectedError, ValidationError
from edge_agent.fsutil import atomic_write_json, fsync_dir, fsync_tree, locked, sha256_file
from edge_agent.wire.names import parse_version, require_newer

if TYPE_CHECKING:  # imported when a self-test runs: the build tools import this module without numpy
    from edge_agent.config import AgentConfig
    from edge_agent.inference.runtime import RuntimeOptions

RESTART_EXIT = 75  # EX_TEMPFAIL: "my slot changed, start me again" (the unit's Restart=on-failure restarts it)
STATE_FILE = "agent-update.json"
VERSION_FILE = "VERSION"
SUMS_FILE = "SHA256SUMS"
BINARY = "edge-agent"
SELFTEST_COMMAND = "__selftest__"
BOOT_COMMAND = "__boot__"
SLOTS = ("a", "b")


# -- the folder's own manifest (written by tools/package.py) ------------------------------------
def write_manifest(folder: Path, version: str) -> None:
    """Write ``VERSION``, then ``SHA256SUMS`` (``sha256sum -c`` format) over every other file."""
    (folder / VERSION_FILE).write_text(version + "\n")
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in _files(folder) if p.name != SUMS_FILE]
    (folder / SUMS_FILE).write_text("".join(lines))


def verify_manifest(folder: Path) -> list[str]:
    """Files that differ from ``SHA256SUMS``, are missing, or are not listed (empty: intact)."""
    try:
        text = (folder / SUMS_FILE).read_text()
    except OSError:
        return [SUMS_FILE]
    listed: dict[str, str] = {}
    for line in text.splitlines():
        digest, _, rel = line.partition("  ")
        listed[rel] = digest
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    bad = [rel for rel, digest in listed.items() if rel not in present or sha256_file(present[rel]) != digest]
    return sorted(bad + [rel for rel in present if rel not in listed and rel != SUMS_FILE])


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def folder_version(folder: Path) -> str:
    try:
        version = (folder / VERSION_FILE).read_text().strip()
        parse_version(version)
    except (OSError, ManifestError) as exc:
        raise ManifestError(f"{folder} has no valid VERSION file: {exc}") from exc
    return version


class AgentSlots:
    """The slots under ``root`` and the update state in ``data_dir``.

    ``fleet_key`` and ``runtime``: the device's ``ota.fleet_key`` and runtime options, given to the
    new build's self-test so that it opens sealed models (#14) and loads them as this device does.
    """

    def __init__(
        self,
        root: Path,
        data_dir: Path,
        *,
        max_starts: int = 3,
        now: Callable[[], float] = time.time,
        fleet_key: Path | None = None,
        runtime: RuntimeOptions | None = None,
    ) -> None:
        self.root, self.data_dir, self.max_starts, self.now = Path(root), Path(data_dir), max_starts, now
        self.fleet_key, self.runtime = fleet_key, runtime
        self.state_file = self.data_dir / STATE_FILE

    # -- reading --------------------------------------------------------------------------------
    def slot_dir(self, slot: str) -> Path:
        return self.root / "slots" / slot

    def link(self, name: str) -> str | None:
        """The slot ``current`` or ``good`` points at (None when missing)."""
        try:
            return Path(os.readlink(self.root / name)).name
        except OSError:
            return None

    def state(self) -> dict[str, Any]:
        """The saved state; on first use, ``good`` is the slot ``current`` points at."""
        try:
            st: dict[str, Any] = json.loads(self.state_file.read_text())
            return st
        except (OSError, ValueError):
            slot = self.link("current") or "a"
            return {"good": {"slot": slot, "version": folder_version(self.slot_dir(slot))}, "pending": None,
                    "last": None}  # fmt: skip

    def status(self) -> dict[str, Any]:
        """``agent_version``, ``slot`` (of ``current``), ``pending`` and ``last`` for the device state."""
        st, slot = self.state(), self.link("current")
        try:
            version = folder_version(self.slot_dir(slot)) if slot else ""
        except ManifestError:
            version = ""
        return {"agent_version": version, "slot": slot, "pending": st["pending"], "last": st["last"]}

    # -- writing --------------------------------------------------------------------------------
    def _lock(self) -> AbstractContextManager[None]:
        return locked(self.data_dir / ".agent-update.lock")

    def _save(self, st: dict[str, Any]) -> None:
        atomic_write_json(self.state_file, st, mode=0o600)

    def _point(self, name: str, slot: str) -> None:
        """Atomically make ``root/name`` a symlink to ``slots/<slot>``."""
        if self.link(name) == slot:
            return
        tmp = self.root / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(f"slots/{slot}", tmp)
        os.replace(tmp, self.root / name)
        fsync_dir(self.root)

    def _result(self, result: str, version: str, reason: str) -> dict[str, Any]:
        return {"result": result, "version": version, "reason": reason, "at": round(self.now(), 3)}

    def install(self, source: Path, version: str, *, rollback: bool = False, selftest_timeout_s: float = 120) -> str:
        """Steps 2-5 of an update: ``stage`` then ``switch`` (the caller exits ``RESTART_EXIT`` after)."""
        slot = self.stage(source, version, rollback=rollback, selftest_timeout_s=selftest_timeout_s)
        self.switch(slot, version)
        return slot

    def stage(self, source: Path, version: str, *, rollback: bool = False, selftest_timeout_s: float = 120) -> str:
        """Unpack ``source`` into the inactive slot and self-test it; returns the slot. ``current`` is untouched.

        ``source`` is the tar (optionally gzipped) of a one-folder build whose top folder is
        ``edge-agent/``, or such a folder. Raises RejectedError (anti-rollback, a bad folder, a
        pending update) or ValidationError (the self-test failed).
        """
        with self._lock():
            st = self.state()
            if st["pending"]:
                raise RejectedError(f"agent update to {st['pending']['version']} is still waiting for its confirm")
            current = self.link("current") or st["good"]["slot"]
            running = folder_version(self.slot_dir(current))
            require_newer("agent version", version, running, rollback=rollback, held="running")
            target = next(s for s in SLOTS if s != current)
            self._unpack(Path(source), target, version)
            self.selftest(target, selftest_timeout_s)
            return target

    def switch(self, slot: str, version: str) -> None:
        """Persist ``pending`` (attempts 0), then point ``current`` at the staged ``slot``."""
        with self._lock():
            st = self.state()
            current = self.link("current") or st["good"]["slot"]
            if slot == current or folder_version(self.slot_dir(slot)) != version:
                raise FailedError(f"slot {slot} does not hold a staged agent {version}")
            st["pending"] = {"version": version, "slot": slot, "previous": current, "attempts": 0,
                             "since": round(self.now(), 3)}  # fmt: skip
            self._save(st)  # persisted before the switch: a start after the switch counts against it
            self._point("current", slot)

    def _unpack(self, source: Path, target: str, version: str) -> None:
        slots = self.root / "slots"
        tmp = slots / f".tmp-{target}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, tmp / BINARY, symlinks=True)
        else:
            try:
                with tarfile.open(source) as tar:
                    tar.extractall(tmp, filter="data")  # no absolute paths, links out or device files
            except (OSError, tarfile.TarError) as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RejectedError(f"agent artifact is not a readable tar: {exc}") from exc
        folder = tmp / BINARY
        bad = verify_manifest(folder) if (folder / BINARY).is_file() else [BINARY]
        if bad or folder_version(folder) != version:
            shutil.rmtree(tmp, ignore_errors=True)
            what = f"files not matching SHA256SUMS: {', '.join(bad[:5])}" if bad else f"VERSION is not {version}"
            raise RejectedError(f"agent artifact refused: {what}")
        fsync_tree(folder)
        shutil.rmtree(self.slot_dir(target), ignore_errors=True)  # the inactive slot: nothing runs from it
        os.replace(folder, self.slot_dir(target))
        fsync_dir(slots)
        shutil.rmtree(tmp, ignore_errors=True)

    def selftest(self, slot: str, timeout_s: float) -> None:
        """Run ``<slot>/edge-agent __selftest__`` on this device's models, key and runtime options."""
        from edge_agent.inference.childproc import options_to_json

        cmd = [str(self.slot_dir(slot) / BINARY), SELFTEST_COMMAND, "--data-dir", str(self.data_dir)]
        cmd += ["--options", options_to_json(self.runtime)]  # the flags of `__validate__`
        cmd += ["--fleet-key", str(self.fleet_key)] if self.fleet_key is not None else []
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ValidationError(f"agent self-test of slot {slot} timed out after {timeout_s:g} s") from exc
        except OSError as exc:
            raise ValidationError(f"agent self-test of slot {slot} did not start: {exc}") from exc
        if done.returncode != 0:
            tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
            raise ValidationError(f"agent self-test of slot {slot} failed (exit {done.returncode}): {tail}")

    def boot(self) -> str:
        """At every start, before the agent runs: count a pending update's start, restore the invariant.

        Returns what it did, for the log.
        """
        with self._lock():
            st, current = self.state(), self.link("current")
            pending, good = st["pending"], st["good"]["slot"]
            if pending and current == pending["slot"]:
                pending["attempts"] += 1
                if pending["attempts"] <= self.max_starts:
                    self._save(st)
                    return f"start {pending['attempts']} of {self.max_starts} of agent {pending['version']}"
                reason = f"not confirmed in {self.max_starts} starts (crashed or unhealthy)"
                self._revert(st, reason)
                return f"rolled back agent {pending['version']}: {reason}"
            if pending:  # killed between persisting pending and the switch
                st["pending"] = None
                st["last"] = self._result("failed", pending["version"], "interrupted before the switch")
                self._save(st)
            self._point("current", good)
            self._point("good", good)
            return f"agent {st['good']['version']} in slot {good}"

    def confirm(self) -> bool:
        """The new agent is healthy: its slot becomes ``good``. False when nothing was pending for it."""
        with self._lock():
            st = self.state()
            pending = st["pending"]
            if not pending or self.link("current") != pending["slot"]:
                return False
            st["good"] = {"slot": pending["slot"], "version": pending["version"]}
            st["pending"] = None
            st["last"] = self._result("committed", pending["version"], "")
            self._save(st)  # before `good` moves: boot() repairs the link from the state
            self._point("good", pending["slot"])
            return True

    def revert(self, reason: str) -> bool:
        """Give up the pending update: record ``rolled-back`` and switch ``current`` back to ``good``."""
        with self._lock():
            st = self.state()
            if not st["pending"]:
                return False
            self._revert(st, reason)
            return True

    def _revert(self, st: dict[str, Any], reason: str) -> None:
        st["last"] = self._result("rolled-back", st["pending"]["version"], reason)
        st["pending"] = None
        self._save(st)  # then the switch; a kill -9 between is finished by the next boot()
        self._point("current", st["good"]["slot"])


def running_slot() -> str | None:
    """The slot this process runs from, when it is a frozen agent in ``<root>/slots/<slot>/``."""
    import sys

    if not getattr(sys, "frozen", False):
        return None
    here = Path(sys.executable).resolve().parent
    return here.name if here.parent.name == "slots" else None


def device_slots(cfg: AgentConfig) -> AgentSlots:
    """The slots of the device ``cfg`` describes, with its fleet key and runtime options for self-tests."""
    u = cfg.agent_update
    return AgentSlots(require_root(u.root), Path(cfg.data_dir), max_starts=u.max_starts, fleet_key=cfg.ota.fleet_key,
                      runtime=cfg.runtime.options())  # fmt: skip


def require_root(root: Path | None) -> Path:
    if root is None:
        raise FailedError("self-update needs a frozen agent installed in slots (agent_update.root is not set)")
    return root
