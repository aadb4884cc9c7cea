"""pytest plugin of the peer suite (scripts/vllm_peer_suite.py): the plugin's
ledger against a recount, throughout vLLM's own tests.

`-p ledger_check --peer-ledger FILE` (tests/peer on sys.path, tests/ for the
oracle): at start-up the plugin is loaded the way vLLM loads it
(`load_general_plugins()`, VLLM_PLUGINS=frag_otel), then the public methods
(and constructors) of vLLM's Scheduler, KVCacheManager and BlockPool classes
and their subclasses are wrapped, test-side, by a depth counter. After each
outermost call (nested calls do not check), and at the end of each test, the
ledger of every block pool in reach is compared with tests/oracle.py's
`brute_force_pool` recount from vLLM's own objects:

- every pool: free, cached and used blocks, free runs, largest free run
  (`pool.blocks` ref counts and hashes, null block excluded);
- a pool with a KVCacheManager on it: each group's used blocks (distinct
  non-null blocks of the group's tables, only groups whose manager allocates
  from this pool), its token slots (computed tokens from the requests of the
  Scheduler that built the manager; a bare manager's requests computed none),
  partial blocks, slot utilisation, requests holding blocks;
- no negative value anywhere in the snapshot, and no drift repaired by the
  plugin's own self-check.

Pools in reach: after a call, the pools of the object called and those built
during the current test whose owner (Scheduler, KVCacheManager or the bare
pool) is still alive; at the test's end, every pool built during it that is
still in memory. vLLM's objects are only ever held weakly (its tests check
that pools die); the requests of a Scheduler are remembered as last seen, as
the ledger holds them. A check never changes a test's outcome: an error while
checking is recorded as a mismatch. FILE gets the counts, and the first
mismatches with their tests, at the end of the session.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import math
import os
import sys
import threading
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the oracle

from oracle import brute_force_pool  # noqa: E402

MAX_EXAMPLES = 40
POOL_FIELDS = ("num_blocks", "used_blocks", "cached_blocks", "free_blocks", "free_runs", "largest_free_run")
SLOT_FIELDS = ("allocated_slots", "used_slots", "unused_slots", "partial_blocks", "tracked_requests")
GROUP_FIELDS = ("block_size", "token_slots", "used_blocks", "allocated_slots", "used_slots", "unused_slots",
                "partial_blocks")


def pytest_addoption(parser):
    parser.addoption("--peer-ledger", default=None, help="check the plugin's ledger; write the counts to this JSON file")


class _Depth(threading.local):
    n = 0


@dataclass
class _Pool:
    """What the check knows of one block pool, all of vLLM's objects held weakly."""

    serial: int
    pool: weakref.ref
    holder: weakref.ref  # the outermost object built on it: its Scheduler, KVCacheManager, or itself
    manager: weakref.ref | None = None  # the KVCacheManager built on it
    groups: tuple = ()  # that manager's per-group managers
    scheduler: weakref.ref | None = None  # the Scheduler that built that manager
    requests: dict | None = None  # that Scheduler's requests, as last seen (the ledger holds them too)

    def layout(self, pool) -> tuple[tuple, dict | None]:
        """The per-group managers of the KVCacheManager built on the pool (none: a bare pool) and
        the live requests of the Scheduler that built that manager (None: a bare manager)."""
        manager = _deref(self.manager)
        if manager is not None:
            if manager.block_pool is not pool:
                return (), None
            groups = tuple(manager.coordinator.single_type_managers)
            scheduler = _deref(self.scheduler)
            if scheduler is not None and scheduler.kv_cache_manager is manager:
                self.requests = scheduler.requests
        else:  # gone, the pool not yet collected
            groups = tuple(_deref(m) for m in self.groups)
            if not groups or any(m is None for m in groups):
                return (), None
        return groups, self.requests


class LedgerCheck:
    def __init__(self, path: str):
        self.path = path
        self.depth = _Depth()
        self.serials = itertools.count(1)
        # weak: a check never keeps vLLM's objects alive (vLLM's tests check that pools die)
        self.info: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> _Pool
        self.pools: list[_Pool] = []  # built during the current test
        self.test = "(collection)"
        self.checks = 0
        self.calls_checked = 0
        self.checked_pools: set[int] = set()
        self.mismatches = 0
        self.mismatched_checks = 0
        self.mismatched_tests: dict[str, int] = {}
        self.fields: dict[str, int] = {}
        self.examples: list[dict] = []
        self.wrapped: list[str] = []
        self.bases: tuple = ()
        self.classes: set = set()
        self.vllm_version = None
        self.plugin_error: str | None = None

    # -- set-up ------------------------------------------------------------------

    def install(self) -> None:
        import vllm
        from vllm.plugins import load_general_plugins

        from vllm_frag_otel.plugin.hooks import instrumentor

        self.vllm_version = vllm.__version__
        load_general_plugins()
        if not instrumentor.is_instrumented:
            self.plugin_error = "vLLM's plugin loader did not instrument (VLLM_PLUGINS, VLLM_FRAG_OTEL_ENABLED?)"
            return
        import vllm.v1.core.sched.async_scheduler  # noqa: F401 - its subclass, wrapped too
        from vllm.v1.core.block_pool import BlockPool
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.core.sched.scheduler import Scheduler

        self.bases = (Scheduler, KVCacheManager, BlockPool)
        self.wrap_new_classes()

    def wrap_new_classes(self) -> None:
        """vLLM's subclasses imported since (a HiSparse pool, ...) get their own methods wrapped."""
        for base in self.bases:
            for cls in _with_subclasses(base):
                if cls in self.classes:
                    continue
                self.classes.add(cls)
                for name, value in list(vars(cls).items()):
                    if inspect.isfunction(value) and (name == "__init__" or not name.startswith("_")):
                        setattr(cls, name, self._wrap(cls, name, value, base))
                        self.wrapped.append(f"{cls.__qualname__}.{name}")

    def _wrap(self, cls, name: str, function, base):
        check = self
        depth = self.depth
        where = f"{cls.__name__}.{name}"
        kind = base.__name__
        constructor = name == "__init__"

        @functools.wraps(function)
        def checked(*args, **kwargs):
            depth.n += 1
            built = False
            try:
                result = function(*args, **kwargs)
                built = constructor
                return result
            finally:
                depth.n -= 1
                try:
                    obj = args[0] if args else kwargs.get("self")
                    if built:
                        check.built(kind, obj)
                    if depth.n == 0:
                        check.after_call(where, kind, obj)
                except Exception as exc:  # never the test's business
                    check.record(f"after {where}", 0, "check-error", f"{type(exc).__name__}: {exc}",
                                 traceback.format_exc(limit=-3)[-600:])

        return checked

    # -- tracking ------------------------------------------------------------------

    def built(self, kind: str, obj) -> None:
        try:
            if kind == "BlockPool":
                self._pool(obj)
                return
            manager = obj if kind == "KVCacheManager" else getattr(obj, "kv_cache_manager", None)
            if manager is None or not hasattr(manager, "block_pool"):
                return
            for pool in self.pools_of("KVCacheManager", manager):
                info = self._pool(pool)
                info.holder = weakref.ref(obj)
                if pool is manager.block_pool:
                    if kind == "KVCacheManager":
                        info.manager = weakref.ref(manager)
                        info.groups = tuple(weakref.ref(m) for m in manager.coordinator.single_type_managers)
                        info.scheduler = None
                        info.requests = None
                    else:
                        info.scheduler = weakref.ref(obj)
                        info.requests = obj.requests
        except Exception as exc:  # a stand-in object: recorded, never raised
            self.record(f"tracking {kind}", 0, "check-error", f"{type(exc).__name__}: {exc}", "")

    def _pool(self, pool) -> _Pool:
        info = self.info.get(pool)
        if info is None:
            info = self.info[pool] = _Pool(next(self.serials), weakref.ref(pool), weakref.ref(pool))
            self.pools.append(info)
        return info

    def pools_of(self, kind: str, obj) -> list:
        pools = []
        try:
            manager = obj.kv_cache_manager if kind == "Scheduler" else obj
            if kind == "BlockPool":
                pools.append(obj)
            elif manager is not None and hasattr(manager, "block_pool"):
                pools.append(manager.block_pool)
                for m in manager.coordinator.single_type_managers:
                    if all(m.block_pool is not p for p in pools):
                        pools.append(m.block_pool)
        except Exception:  # before __init__ set it up, or a stand-in object (a Mock)
            pass
        return pools

    # -- checking ------------------------------------------------------------------

    def after_call(self, where: str, kind: str, obj) -> None:
        self.calls_checked += 1
        self.check_all(f"after {where}", self.pools_of(kind, obj), only_held=True)

    def check_all(self, where: str, extra=(), only_held: bool = False) -> None:
        self.depth.n += 1  # what the check calls of vLLM's (get_num_free_blocks) is not checked in turn
        try:
            self._check_all(where, extra, only_held)
        except Exception as exc:
            self.record(where, 0, "check-error", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=-3)[-600:])
        finally:
            self.depth.n -= 1

    def _check_all(self, where: str, extra, only_held: bool) -> None:
        """The pools of the object called, and those built during this test that are still
        in use (after a call: their Scheduler, manager or pool is alive; at the test's
        end: still in memory)."""
        seen: dict[int, tuple] = {}
        for pool in extra:
            info = self.info.get(pool) if _weakrefable(pool) else None
            if info is not None:
                seen[info.serial] = (info, pool)
        for info in self.pools:
            pool = info.pool()
            if pool is not None and info.serial not in seen and (not only_held or info.holder() is not None):
                seen[info.serial] = (info, pool)
        for info, pool in seen.values():
            self.check_pool(where, info, pool)

    def check_pool(self, where: str, info: _Pool, pool) -> None:
        from vllm_frag_otel import analyzer_for

        serial = info.serial
        self.checks += 1
        self.checked_pools.add(serial)
        before = self.mismatches
        try:
            snapshot = analyzer_for(pool).snapshot()
            groups, requests = info.layout(pool)
            truth = brute_force_pool(pool, groups, requests)
            vllm_free = pool.get_num_free_blocks()
            if vllm_free != truth["free_blocks"]:  # the recount's own premise, from vLLM's free queue
                self.record(where, serial, "vllm_free_queue", vllm_free, truth["free_blocks"])
            for field in POOL_FIELDS:
                self.compare(where, serial, field, getattr(snapshot, field), truth[field])
            if groups:
                for field in SLOT_FIELDS:
                    self.compare(where, serial, field, getattr(snapshot, field), truth[field])
                if not math.isclose(snapshot.slot_utilization, truth["slot_utilization"], abs_tol=1e-9):
                    self.record(where, serial, "slot_utilization", snapshot.slot_utilization,
                                truth["slot_utilization"])
                if len(snapshot.groups) != len(truth["groups"]):
                    self.record(where, serial, "groups", len(snapshot.groups), len(truth["groups"]))
                for got, want in zip(snapshot.groups, truth["groups"]):
                    for field in GROUP_FIELDS:
                        self.compare(where, serial, f"group {want['group']} {field}", getattr(got, field),
                                     want[field])
            for field in snapshot.numeric_fields():
                value = getattr(snapshot, field)
                if value < 0:
                    self.record(where, serial, f"{field} < 0", value, ">= 0")
            for group in snapshot.groups:
                for field in ("used_blocks", "allocated_slots", "used_slots", "unused_slots", "partial_blocks"):
                    if getattr(group, field) < 0:
                        self.record(where, serial, f"group {group.group} {field} < 0", getattr(group, field), ">= 0")
            if snapshot.drift_repairs:
                self.record(where, serial, "drift_repairs", snapshot.drift_repairs, 0)
        except Exception as exc:
            self.record(where, serial, "check-error", f"{type(exc).__name__}: {exc}",
                        traceback.format_exc(limit=-3)[-600:])
        if self.mismatches != before:
            self.mismatched_checks += 1

    def compare(self, where: str, serial: int, field: str, got, want) -> None:
        if got != want:
            self.record(where, serial, field, got, want)

    def record(self, where: str, serial: int, field: str, ledger, recount) -> None:
        self.mismatches += 1
        self.mismatched_tests[self.test] = self.mismatched_tests.get(self.test, 0) + 1
        key = field.split(" ", 2)[-1] if field.startswith("group ") else field
        self.fields[key] = self.fields.get(key, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"test": self.test, "where": where, "pool": serial, "field": field,
                                  "ledger": _plain(ledger), "recount": _plain(recount)})

    # -- pytest hooks --------------------------------------------------------------

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.test = item.nodeid
        self.pools = []
        self.wrap_new_classes()
        yield
        self.pools = []
        self.test = "(between tests)"

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        yield
        self.check_all("end of test")

    def pytest_sessionfinish(self, session):
        from vllm_frag_otel.plugin.hooks import guard, instrumentor

        result = {
            "vllm_version": self.vllm_version,
            "instrumented": instrumentor.is_instrumented,
            "plugin_error": self.plugin_error,
            "hook_errors": guard().errors,
            "plugin_active": guard().active,
            "wrapped_methods": len(self.wrapped),
            "calls_checked": self.calls_checked,
            "checks": self.checks,
            "pools": len(self.checked_pools),
            "mismatches": self.mismatches,
            "mismatched_checks": self.mismatched_checks,
            "mismatched_tests": self.mismatched_tests,
            "mismatched_fields": self.fields,
            "examples": self.examples,
        }
        Path(self.path).write_text(json.dumps(result, indent=1))


def _with_subclasses(cls) -> list[type]:
    found, todo = [], [cls]
    while todo:
        c = todo.pop()
        if c not in found and c.__module__.startswith("vllm."):
            found.append(c)
            todo.extend(c.__subclasses__())
    return found


def _deref(ref):
    return ref() if ref is not None else None


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _plain(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def pytest_configure(config):
    path = config.getoption("--peer-ledger")
    if path:
        os.environ.setdefault("VLLM_PLUGINS", "frag_otel")
        check = LedgerCheck(path)
        check.install()
        config.pluginmanager.register(check, "peer-ledger-check")
