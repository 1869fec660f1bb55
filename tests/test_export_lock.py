"""`deleaker.export_lock`: an export runs alone in the process; other torch work runs side by side, never during one.

torch.export keeps tracing state process-wide (seen: ``KeyError: 'custom'`` from ``torch.fx.proxy`` in a thread
that encoded a prompt while another thread exported), so the runtime's torch work and the exports share this lock.
"""

from __future__ import annotations

import threading
import time

import pytest

from deleaker.export_lock import _SharedExclusiveLock


def test_torch_work_waits_for_an_export_and_runs_side_by_side_otherwise():
    lock = _SharedExclusiveLock()
    events: list[str] = []
    inside = threading.Barrier(3)

    def work(name: str) -> None:
        with lock.shared():
            events.append(f"{name} in")
            inside.wait(timeout=10)  # all three holders of the shared side are in at once
            events.append(f"{name} out")

    with lock.exclusive():
        workers = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(3)]
        for w in workers:
            w.start()
        time.sleep(0.3)
        assert events == [], "torch work started while an export ran"
        events.append("export done")
    for w in workers:
        w.join(timeout=10)
    assert events[0] == "export done" and len(events) == 7


def test_an_export_waits_for_running_torch_work_and_goes_before_new_work():
    lock = _SharedExclusiveLock()
    events: list[str] = []
    release = threading.Event()

    def long_work() -> None:
        with lock.shared():
            events.append("work in")
            release.wait(timeout=10)
            events.append("work out")

    def export() -> None:
        with lock.exclusive():
            events.append("export")

    def late_work() -> None:
        with lock.shared():
            events.append("late work")

    first = threading.Thread(target=long_work)
    first.start()
    while "work in" not in events:
        time.sleep(0.01)
    exporter = threading.Thread(target=export)
    exporter.start()
    time.sleep(0.2)
    late = threading.Thread(target=late_work)  # arrives while the export waits: it goes after the export
    late.start()
    time.sleep(0.2)
    assert events == ["work in"]
    release.set()
    for t in (first, exporter, late):
        t.join(timeout=10)
    assert events == ["work in", "work out", "export", "late work"]


def test_shared_side_is_reentrant_and_an_export_inside_it_is_refused():
    lock = _SharedExclusiveLock()
    with lock.shared():
        with lock.shared():
            pass
        with pytest.raises(RuntimeError, match="wait for itself"):
            with lock.exclusive():
                pass
    with lock.exclusive():  # everything was released
        pass
