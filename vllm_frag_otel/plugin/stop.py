"""vLLM's stop, seen from both of its processes.

With vLLM's default `--shutdown-timeout 0` ("abort" mode) the front end SIGTERMs
each engine-core process and SIGKILLs it at once: the engine core's teardown
(its workers' exit, 3-4 s on a CPU, then `Scheduler.shutdown`) never reaches the
plugin's flush. Two hooks make the flush hold whatever the mode:

- in the engine core, `EngineCore.shutdown` flushes first, before vLLM's own
  teardown: the busy loop has ended, nothing of vLLM's changes any more (a
  SIGTERM that arrives meanwhile is held until the flush ends);
- in the front end, `CoreEngineProcManager.shutdown` gives the engine cores
  VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT before the kill where vLLM would give them
  less. A process that exits sooner ends the wait sooner.

So vLLM's stop takes at most VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT longer (0: no
longer, and nothing is flushed in abort mode). The flush's budget counts from
the engine core's first stop signal. Both hooks are optional: where vLLM moved
them, the KV-cache hooks run all the same and the engine core warns once that a
stop in abort mode loses what was not exported yet.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from time import monotonic

from vllm_frag_otel.config import load_settings
from vllm_frag_otel.plugin.hooks import _arg, _hooked, _resolve, engine_stopped, guard
from vllm_frag_otel.plugin.versions import STOP_HOOK_POINTS

logger = logging.getLogger("vllm.frag_otel")

# In a stop window shorter than the plugin's (abort mode), what the engine core's
# flush leaves of VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT for the way from the front end's
# SIGTERM to EngineCore.shutdown and for its last log line: the flush, and its
# report of what it could not deliver, end before the front end's kill.
ABORT_RESERVE_S = 0.5


def flush_seconds(vllm_window: float | None, timeout: float, since_signal: float = 0.0) -> float | None:
    """How long the engine core's flush may take: VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT
    (None) when vLLM's own stop window holds it, else what the front end's grace
    leaves before its kill, `since_signal` seconds after this process's first stop
    signal (vLLM's own stop path took them)."""
    if vllm_window is not None and vllm_window >= timeout + ABORT_RESERVE_S:
        return None
    return max(0.0, timeout - min(ABORT_RESERVE_S, timeout / 2) - since_signal)


_first_stop_signal: list[float] = []  # when this engine core got its first SIGTERM or SIGINT


def note_stop_signals() -> None:
    """In an engine-core process, after vLLM installed its SIGTERM and SIGINT
    handlers: note when the first one comes (then call vLLM's). A signal to the
    whole process group reaches the engine core before the front end's SIGTERM,
    and vLLM's stop path may take seconds to reach EngineCore.shutdown; the
    flush's budget counts from that first signal."""
    if threading.current_thread() is not threading.main_thread() or \
            not multiprocessing.current_process().name.startswith("EngineCore"):
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        vllm_handler = signal.getsignal(signum)
        if not callable(vllm_handler) or getattr(vllm_handler, "__vllm_frag_otel_hook__", False):
            continue

        def noted(number, frame, vllm_handler=vllm_handler):
            if not _first_stop_signal:
                _first_stop_signal.append(monotonic())
            return vllm_handler(number, frame)

        noted.__vllm_frag_otel_hook__ = True
        signal.signal(signum, noted)


@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """A SIGTERM that arrives in here is delivered again as it ends.

    vLLM restores SIGTERM's default action before EngineCore.shutdown. When a
    signal to the whole process group (Ctrl-C) reached the engine core first,
    the front end's SIGTERM follows at once and would kill it mid-flush; this
    delays that death by at most the flush's bounded time. Only on the main
    thread (where Python runs signal handlers) and only over the default action."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if received:
            os.kill(os.getpid(), signal.SIGTERM)


def _flush_first(wrapped, engine_core, args, kwargs):
    """EngineCore.shutdown: the plugin's stop, then vLLM's teardown."""
    scheduler = getattr(engine_core, "scheduler", None)
    if scheduler is not None:
        # first: vLLM has just restored SIGTERM's default action, and after a Ctrl-C the front
        # end's SIGTERM is on its way; one that lands before the deferral ends the process with
        # nothing flushed and nothing logged (the likely cause of a Ctrl-C stop seen, on a loaded
        # 2-core machine, to end 0.6 s after the signal with neither the flush's report nor a kill)
        with sigterm_deferred():
            seconds = None
            with guard():
                window = getattr(getattr(engine_core, "vllm_config", None), "shutdown_timeout", None)
                since_signal = monotonic() - _first_stop_signal[0] if _first_stop_signal else 0.0
                seconds = flush_seconds(window, load_settings().shutdown_timeout, since_signal)
            engine_stopped(scheduler, seconds)
    return wrapped(engine_core, *args, **kwargs)


def _grace_before_kill(wrapped, manager, args, kwargs):
    """CoreEngineProcManager.shutdown(timeout): SIGTERM, wait `timeout`, SIGKILL."""
    timeout = _arg(args, kwargs, 0, "timeout", None)
    grace = None
    with guard():
        plugin_timeout = load_settings().shutdown_timeout
        if timeout is not None and timeout < plugin_timeout:
            grace = plugin_timeout
            logger.info(
                "vllm-frag-otel: the engine core gets up to %gs (VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT) to flush its "
                "KV-cache telemetry before vLLM stops it (vLLM's own window: %gs)", grace, timeout,
            )
    if grace is None:
        return wrapped(manager, *args, **kwargs)
    if args:
        return wrapped(manager, grace, *args[1:], **kwargs)
    return wrapped(manager, *args, **{**kwargs, "timeout": grace})


WRAPPERS: dict[str, Callable] = {
    "EngineCore.shutdown": _flush_first,
    "CoreEngineProcManager.shutdown": _grace_before_kill,
}


class StopInstrumentor:
    """Wraps and unwraps the stop hooks; all or nothing. `problem` says why not."""

    def __init__(self) -> None:
        self._wrapped: list[tuple[type, str]] = []
        self.problem: str | None = None

    @property
    def is_instrumented(self) -> bool:
        return bool(self._wrapped)

    def instrument(self) -> bool:
        if self._wrapped:
            return True
        resolved = []
        for point in STOP_HOOK_POINTS:
            target = _resolve(point)
            if isinstance(target, str):
                self.problem = target
                return False
            resolved.append((target, point))
        self.problem = None
        for (cls, method), point in resolved:
            setattr(cls, method, _hooked(cls.__dict__[method], WRAPPERS[point.qualname]))
            self._wrapped.append((cls, method))
        return True

    def uninstrument(self) -> None:
        for cls, method in reversed(self._wrapped):
            setattr(cls, method, cls.__dict__[method].__wrapped__)
        self._wrapped.clear()


stop_instrumentor = StopInstrumentor()

# What vLLM's engine core spends on its stop besides the plugin's flush, measured
# with the CPU server: the workers' exit (3-4 s) and its own teardown (2-3 s).
VLLM_ENGINE_STOP_SECONDS = 7


def install() -> None:
    """register()'s part, after the KV-cache hooks: the stop hooks, noting the
    engine core's first stop signal; or, in an engine core, one warning why not."""
    if stop_instrumentor.instrument():
        note_stop_signals()
    elif multiprocessing.current_process().name.startswith("EngineCore"):
        logger.warning(
            "vllm-frag-otel: the plugin cannot hook vLLM's stop (%s): with --shutdown-timeout 0 (vLLM's default) "
            "vLLM kills the engine core at once on SIGTERM, so the metrics, spans and block maps since the last "
            "export are lost; start vLLM with --shutdown-timeout %d or more to keep them.",
            stop_instrumentor.problem, math.ceil(load_settings().shutdown_timeout) + VLLM_ENGINE_STOP_SECONDS,
        )
