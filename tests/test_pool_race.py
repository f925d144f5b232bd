"""The interpreter pool under the interleavings the HTTP soak and stress runs produced (issue: race).

Real tflite-runtime interpreters on the shipped digits model. The interleavings are built
exactly, not hoped for: a spying backend (injected through ``RuntimeOptions.backend``) parks a
call inside ``invoke``, and a profile hook reports the moment a thread enters the pool's
blocking ``get``. Thread joins carry a generous bound only so that a regression fails instead
of hanging the suite; nothing asserts on time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.inference.interpreter import Backend, default_backend
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.wire.model.manifest import Manifest

HANG_GUARD_S = 30.0  # a thread still alive after this is stuck for good (each step takes milliseconds)


class Parking:
    """A backend whose interpreters stop inside ``invoke`` while ``hold`` is set, until ``go`` is set."""

    def __init__(self) -> None:
        self.hold = threading.Event()
        self.parked = threading.Event()
        self.go = threading.Event()
        self.opened = 0
        real = default_backend()
        outer = self

        class Parked:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                outer.opened += 1
                self._interp = real.interpreter(*args, **kwargs)

            def invoke(self) -> None:
                if outer.hold.is_set():
                    outer.hold.clear()
                    outer.parked.set()
                    outer.go.wait()
                self._interp.invoke()

            def __getattr__(self, name: str) -> Any:
                return getattr(self._interp, name)

        self.backend = Backend(real.name, Parked, real.load_delegate)


def load_digits(digits_dir: Path, options: RuntimeOptions) -> LoadedModel:
    manifest = Manifest.load(digits_dir / "manifest.json")
    return LoadedModel(digits_dir / manifest.file, manifest, options)


def pixels(rows: int) -> dict[str, np.ndarray]:
    return {"pixels": np.random.default_rng(rows).uniform(0, 16, (rows, 8, 8, 1)).astype(np.float32)}


def blocking_get_hook(entered: threading.Event) -> Any:
    """A ``threading.setprofile`` hook that sets ``entered`` when the thread calls ``SimpleQueue.get``."""

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") == "get" and "SimpleQueue" in repr(arg):
            entered.set()

    return hook


def test_a_waiter_survives_the_drop_of_the_interpreter_it_waited_for(digits_dir: Path) -> None:
    """A big batch drops its interpreter (``max_resident_batch``) while another call waits for one.

    Before the fix the drop only decremented the pool's count: the waiter, already blocked in
    the queue's ``get``, never got an interpreter, and with it the event loop serving inline
    predictions hung for good (the stress run's hang: the agent stopped answering).
    """
    parking = Parking()
    model = load_digits(digits_dir, RuntimeOptions(pool_size=1, max_resident_batch=1, backend=parking.backend))
    results: dict[str, Any] = {}

    def big() -> None:
        results["big"] = model.predict(pixels(4))  # 4 rows > max_resident_batch: dropped after the call

    def small() -> None:
        results["small"] = model.predict(pixels(1))

    parking.hold.set()
    a = threading.Thread(target=big, daemon=True)
    a.start()
    assert parking.parked.wait(HANG_GUARD_S), "the big batch never reached invoke"
    entered = threading.Event()
    threading.setprofile(blocking_get_hook(entered))  # for threads started from here on
    try:
        b = threading.Thread(target=small, daemon=True)
        b.start()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    assert entered.wait(HANG_GUARD_S), "the waiter never reached the pool's blocking get"
    parking.go.set()  # the big batch finishes; its interpreter is dropped
    a.join(HANG_GUARD_S)
    b.join(HANG_GUARD_S)
    assert not b.is_alive(), "the waiter is stuck: the dropped interpreter's slot was never handed on"
    assert results["big"]["probs"].shape == (4, 10) and results["small"]["probs"].shape == (1, 10)
    assert parking.opened == 2  # the first interpreter, then a fresh one in the dropped one's place
    again = model.predict(pixels(1))["probs"]
    np.testing.assert_array_equal(again, results["small"]["probs"])
