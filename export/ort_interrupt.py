"""Running an ONNX Runtime session so that Ctrl-C and SIGTERM stop it between two nodes (`run_interruptible`)."""

from __future__ import annotations

import threading
from typing import Any, Dict, Mapping, Sequence


def run_interruptible(session: Any, output_names: Sequence[str], feeds: Mapping[str, Any]) -> list:
    """``session.run(output_names, feeds)`` that Ctrl-C (or SIGTERM) stops between two nodes, also in a long run.

    Python raises KeyboardInterrupt only in the main thread and only between bytecodes, never while ONNX Runtime
    computes; and an exception raised while ONNX Runtime still runs in another thread lets the process exit with it
    running, which aborts ("terminate called without an active exception"). So, from the main thread: the run goes
    to a worker thread; for exactly as long as that thread lives, SIGINT and SIGTERM only set a flag (their handlers
    are swapped for one that records the signal), and a recorded signal tells the run to stop
    (``RunOptions.terminate``). Once the worker is gone the handlers are restored and each recorded signal is
    handed to the handler it would have reached (KeyboardInterrupt for Ctrl-C). From any other thread (where no
    signal handler runs) this is ``session.run``.
    """
    if threading.current_thread() is not threading.main_thread():
        return session.run(list(output_names), dict(feeds))
    import signal

    import onnxruntime as ort

    options = ort.RunOptions()
    outcome: Dict[str, Any] = {}
    received: list[int] = []

    def work() -> None:
        try:
            outcome["outputs"] = session.run(list(output_names), dict(feeds), options)
        except BaseException as exc:  # noqa: BLE001  (handed to the waiting thread)
            outcome["error"] = exc

    def record(signum: int, frame: Any) -> None:
        received.append(signum)
        options.terminate = True  # ONNX Runtime stops before its next node

    previous: Dict[int, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, record)
        worker = threading.Thread(target=work, name="deleaker-ort-run", daemon=True)
        worker.start()
        # The handlers only record, so nothing interrupts this wait: it returns once the worker has left.
        worker.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(received):
        _deliver(signum, previous[signum])
    if "error" in outcome:
        raise outcome["error"]
    return outcome["outputs"]


def _deliver(signum: int, handler: Any) -> None:
    """What ``signum`` would have done under ``handler`` (the handler it found when the run started)."""
    import signal

    if callable(handler):
        handler(signum, None)  # Python's default SIGINT handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action: the process ends by this signal
    # SIG_IGN: ignored, as it would have been
