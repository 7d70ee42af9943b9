"""Stopping a run cleanly on Ctrl-C or SIGTERM.

A signal only reaches the main thread, while training runs in Prefect worker threads that Python
cannot interrupt. So a signal sets one process-wide stop request and interrupts the main thread
once; every training loop checks the request between batches and raises `RunInterrupted`, which
(being a `KeyboardInterrupt`) no `except Exception` swallows: Optuna records the trial as failed
and re-raises, the stage fails, and the pipeline run is closed as KILLED with the reason.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_stop = threading.Event()
_reason: list[str] = []


class RunInterrupted(KeyboardInterrupt):
    """The run was asked to stop (a signal, or another stage failed)."""


def request_stop(reason: str) -> None:
    if not _stop.is_set():
        _reason.append(reason)
        _stop.set()


def check_stop() -> None:
    """Raise `RunInterrupted` if a stop was requested; cheap enough to call every batch."""
    if _stop.is_set():
        raise RunInterrupted(_reason[0])


def clear_stop() -> None:
    """Forget a handled stop request (a process that starts another run afterwards: tests)."""
    _stop.clear()
    _reason.clear()


def interruption(err: BaseException) -> str | None:
    """Why the run was stopped when `err` is a stop (ours, a bare Ctrl-C, or the `TerminationSignal`
    that Prefect's own SIGTERM handler raises inside a flow: a deployment's cancel, or `kill`);
    None for a real failure."""
    from prefect.exceptions import TerminationSignal

    if isinstance(err, TerminationSignal):
        return f"stopped by {signal.Signals(err.signal).name}"
    if isinstance(err, KeyboardInterrupt):
        return str(err) or "stopped by SIGINT"
    return None


def exit_code(reason: str) -> int:
    """Shell convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (signal.SIGTERM if "SIGTERM" in reason else signal.SIGINT).value


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM request a stop and interrupt the main thread once; a repeated
    signal only says the stop is under way, so the run can still record why it ended."""

    def handler(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if _stop.is_set():  # Prefect hands a SIGTERM it handled on to this handler: that is no news
            if _reason[0] != f"stopped by {name}":
                print(f"modelforge: {name}: already stopping ({_reason[0]})", file=sys.stderr, flush=True)
            return
        request_stop(f"stopped by {name}")
        print(
            f"modelforge: {name} received: stopping (finished trials are kept; rerun to resume)",
            file=sys.stderr,
            flush=True,
        )
        raise RunInterrupted(f"stopped by {name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
