"""The thin vLLM-facing layer: wrap methods of vLLM's v1 KV-cache classes.

Every wrapper calls vLLM first, unchanged, and then reports what happened to
the pool's `KVCacheState` as block ids. Reporting is contained by `_guard`: an
exception never reaches vLLM; it is counted, and after too many the plugin
turns itself off with one log line and every wrapper becomes a pass-through.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import random
import re
import textwrap
import threading
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass
from time import monotonic, perf_counter
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from vllm_frag_otel.export import telemetry
from vllm_frag_otel.plugin.versions import (
    BLOCK_ONLY_MANAGERS,
    DIRECT_EVICTION_MANAGERS,
    GROWING_TABLE_MANAGERS,
    HOOK_POINTS,
    OLDEST_VLLM,
    SUPPORTED_VLLM,
    TOKEN_SLOT_MANAGERS,
    HookPoint,
)
from vllm_frag_otel.core.state import NULL_BLOCK_ID, GroupLayout, KVCacheState
from vllm_frag_otel.core.stories import RequestStories

logger = logging.getLogger("vllm.frag_otel")

# Instance attribute holding a BlockPool's state, or a KVCacheManager's
# (state, per-group single-type managers). KVCacheBlock is slotted, pools are not.
# Set and read with setattr/getattr, never through `obj.__dict__`: on CPython
# 3.11 and 3.12 (measured; not 3.10 or 3.13) reading an instance's `__dict__`
# moves its attributes out of the inline values, and every `self.x` in vLLM's
# own methods of that object gets about twice as slow for the rest of the process.
_STATE = "_vllm_frag_otel"


class HookGuard:
    """Contains hook errors: counts them and disables the plugin after `max_errors`."""

    def __init__(self, max_errors: int = 10):
        self.max_errors = max_errors
        self.active = True
        self.errors = 0

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or not issubclass(exc_type, Exception):
            return False
        self.failed(exc)
        return True

    def failed(self, exc: Exception) -> None:
        """Count a contained error; the hottest hooks call this from try/except
        (cheaper than entering this context manager on every call)."""
        self.errors += 1
        logger.debug("vllm-frag-otel hook error", exc_info=exc)
        if self.active and self.errors >= self.max_errors:
            self.active = False
            logger.warning(
                "vllm-frag-otel: disabled after %d hook errors (last: %s: %s at %s); "
                "vLLM is unaffected, KV-cache telemetry stops.",
                self.errors, type(exc).__name__, exc, _innermost_frame(exc.__traceback__),
            )


def _innermost_frame(tb) -> str:
    if tb is None:
        return "no traceback"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


_guard = HookGuard()


def guard() -> HookGuard:
    return _guard


_REQUIRED = object()


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = _REQUIRED) -> Any:
    """A wrapped method's argument, by position (after self) or keyword (or `default`)."""
    if len(args) > index:
        return args[index]
    return kwargs[name] if default is _REQUIRED else kwargs.get(name, default)


def _pool_state(pool) -> KVCacheState | None:
    return getattr(pool, _STATE, None) if _guard.active else None


@dataclass(frozen=True)
class _Forwarder:
    """A hook for the hottest points, compiled with the original's own
    parameter list: the call's arguments are bound once, by the interpreter,
    and handed on by position. With `*args, **kwargs` forwarding the
    allocate_slots hook added 7,200 instructions per call; compiled, the
    same hook adds 1,800 (callgrind).

    `body` is the function body; `{arguments}` becomes the original's
    arguments and `{first}` the name of its first parameter after self; it
    may read `original` and the module's globals.
    """

    body: str


class _Source(str):
    """Renders as itself in a signature: a default value's name in the compiled source."""

    def __repr__(self) -> str:
        return str(self)


def _compile(original: Callable, forwarder: _Forwarder) -> Callable:
    signature = inspect.signature(original)
    kinds = inspect.Parameter
    parameters, arguments, defaults = [], [], {}
    for i, p in enumerate(signature.parameters.values()):
        name = "self" if i == 0 else p.name
        if p.default is not p.empty:
            defaults[name] = p.default
        parameters.append(p.replace(
            name=name, annotation=p.empty, default=p.empty if p.default is p.empty else _Source(f"_defaults[{name!r}]")
        ))
        prefix = {kinds.VAR_POSITIONAL: "*", kinds.VAR_KEYWORD: "**", kinds.KEYWORD_ONLY: f"{name}="}.get(p.kind, "")
        arguments.append(prefix + name)
    bound = re.findall(r"^\s*(\w+) = |(\w+) := |\bas (\w+)", forwarder.body, re.M)
    clash = ({name for names in bound for name in names if name} | {"original", "_defaults", "hooked"}) & {
        p.name for p in parameters
    }
    if clash:
        raise ValueError(f"{original.__qualname__} has parameters named like the hook's own variables: {sorted(clash)}")
    header = signature.replace(parameters=parameters, return_annotation=signature.empty)
    first = parameters[1].name if len(parameters) > 1 else ""
    body = textwrap.indent(textwrap.dedent(forwarder.body).format(arguments=", ".join(arguments), first=first), " " * 8)
    source = (
        f"def factory(original, _defaults):\n    def hooked{header}:\n{body}\n    return hooked\n"
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<vllm-frag-otel hook of {original.__qualname__}>", "exec"), globals(), namespace)
    return namespace["factory"](original, defaults)


def _pool_init(wrapped, pool, args, kwargs):
    wrapped(pool, *args, **kwargs)
    with _guard:
        if pool.num_gpu_blocks < 2:  # a lookup-only view (a KV connector's), no pool to count
            return
        setattr(pool, _STATE, KVCacheState(pool.num_gpu_blocks, [pool.hash_block_size]))
        _hook_pool(pool)  # until its KV-cache manager says none of its groups needs it


# The hooks called for every block event are `_Forwarder`s: their bodies take
# vLLM's own parameter names ({first}: the first after self). Each frame
# counts on this path, so the state lookup and the event are inlined (a hook
# error is contained with try/except: entering and leaving the guard would be
# two more Python calls per event).

def _tracked_or_original(name: str) -> str:
    """A forwarder's opening: `name` = what the plugin keeps on `self` (_STATE), or
    straight to vLLM's original when `self` is not tracked or the plugin is off."""
    return f"""
    try:
        {name} = self._vllm_frag_otel  # _STATE; an attribute read costs a third of __dict__.get()
    except AttributeError:  # built before instrumentation
        return original({{arguments}})
    if not _guard.active:
        return original({{arguments}})
"""


_POOL_STATE = _tracked_or_original("state")


def _under_lock(call: str) -> str:
    """`call` on the pool's state under its lock, as a line block of a forwarder's `try:`.
    acquire/try/finally/release, not a `with` statement: 860 instructions over a bare
    call against 1,890 (callgrind)."""
    return f"""        lock = state.lock
        lock.acquire()
        try:
            {call}
        finally:
            lock.release()"""


_GET_NEW_BLOCKS = _Forwarder(_POOL_STATE + """
    state.evictions_counted_by_caller = True  # popped cached blocks are counted below, as capacity evictions
    try:
        blocks = original({arguments})
    finally:
        state.evictions_counted_by_caller = False
    try:
        allocated = []  # popped from this pool's free list: all its own
        for b in blocks:
            allocated.append(b.block_id)
""" + _under_lock("state.on_blocks_allocated(allocated, monotonic())") + """
    except Exception as exc:
        _guard.failed(exc)
    return blocks
""")


def _owned(pool_blocks: list, block) -> bool:
    """Whether `block` is this pool's own: its id names it in the pool. How a
    block records its pool changed (0.33: the pool, 0.34: a weak reference),
    what a pool's block list holds did not. (The per-block forwarders inline
    the same test: a call per block is a Python frame per block.)"""
    block_id = block.block_id
    return block_id < len(pool_blocks) and pool_blocks[block_id] is block


_MAYBE_EVICT_CACHED_BLOCK = _Forwarder("""
    evicted = original({arguments})
    if evicted:
        _entry_replaced(self, block)
    return evicted
""")

# Hooks set on a pool instance, not on the class: vLLM calls
# `_maybe_evict_cached_block` for every block get_new_blocks hands out (the
# caller counts those evictions itself), and directly only from the managers
# in DIRECT_EVICTION_MANAGERS; a pool serves none of those unless a Mamba
# group (or a manager this version does not know) allocates from it, and a
# hook frame per block handed out is not paid where it is not needed.
PER_POOL_HOOKS: dict[str, _Forwarder] = {"BlockPool._maybe_evict_cached_block": _MAYBE_EVICT_CACHED_BLOCK}
_per_pool_hooks: dict[str, Callable] = {}  # method name -> compiled hook, while instrumented
_pools_hooked: weakref.WeakSet = weakref.WeakSet()


def _hook_pool(pool) -> None:
    for method, hook in _per_pool_hooks.items():
        setattr(pool, method, hook.__get__(pool))
    if _per_pool_hooks:
        _pools_hooked.add(pool)


def _unhook_pool(pool) -> None:
    for method in _per_pool_hooks:
        try:
            delattr(pool, method)  # the instance's hook; the class's own method stays
        except AttributeError:
            pass
    _pools_hooked.discard(pool)


def _calls_evictions_directly(group_manager) -> bool:
    manager_class = type(group_manager).__name__
    return manager_class in DIRECT_EVICTION_MANAGERS or manager_class not in TOKEN_SLOT_MANAGERS | BLOCK_ONLY_MANAGERS


def _entry_replaced(pool, block) -> None:
    """vLLM also calls `_maybe_evict_cached_block` directly (Mamba "align" drops
    a transient checkpoint's entry: its state is overwritten in place); it is
    called for every block get_new_blocks pops, so its hook's common path is
    one test."""
    state = _pool_state(pool)
    if state is not None and not state.evictions_counted_by_caller and _owned(pool.blocks, block):
        try:
            with state.lock:
                state.on_block_unhashed(block.block_id, "replaced", monotonic())
        except Exception as exc:
            _guard.failed(exc)


# The per-call hooks filter blocks in a plain loop, not a list comprehension:
# on CPython 3.11 a comprehension builds a function and a frame per call
# (about 1,500 instructions, more than its work on one or two blocks).

_TOUCH = _Forwarder(_POOL_STATE + """
    result = original({arguments})
    try:
        own, size = self.blocks, len(self.blocks)
        touched = []
        for b in blocks:
            if not b.is_null and b.block_id < size and own[b.block_id] is b:
                touched.append(b.block_id)
""" + _under_lock("state.on_blocks_touched(touched)") + """
    except Exception as exc:
        _guard.failed(exc)
    return result
""")


# free_blocks / unpin_blocks: blocks whose ref_cnt reaches 0 become free. vLLM
# passes a one-shot `reversed(...)` iterator: it is materialised once and the
# list handed on, so vLLM and the hook see the same blocks. A table can hold
# another pool's blocks (a HiSparse host group): vLLM hands those on to their
# own pool, whose hook counts them.


def _release(event: str) -> _Forwarder:
    """A hook of a release method that reports the blocks it freed as `event`."""
    return _Forwarder(_POOL_STATE + """
    {first} = list({first})
    result = original({arguments})
    try:
        own, size = self.blocks, len(self.blocks)
        released = []
        for b in {first}:
            if b.ref_cnt == 0 and not b.is_null and b.block_id < size and own[b.block_id] is b:
                released.append(b.block_id)
""" + _under_lock(f"state.{event}(released, monotonic())") + """
    except Exception as exc:
        _guard.failed(exc)
    return result
""")


_CACHE_FULL_BLOCKS = _Forwarder(_POOL_STATE + """
    result = original({arguments})
    try:
        own, size = self.blocks, len(self.blocks)
        hashed = []
        for i in range(num_cached_blocks, min(num_full_blocks, len(blocks))):
            b = blocks[i]
            if not b.is_null and b.block_hash is not None and b.block_id < size and own[b.block_id] is b:
                hashed.append(b.block_id)
""" + _under_lock("state.on_blocks_hashed(hashed, monotonic())") + """
    except Exception as exc:
        _guard.failed(exc)
    return result
""")


def _cache_partial_block(wrapped, pool, args, kwargs):
    result = wrapped(pool, *args, **kwargs)
    state = _pool_state(pool)
    if state is not None:
        with _guard:
            block = _arg(args, kwargs, 1, "block")
            if block.is_null or not _owned(pool.blocks, block):
                return result
            with state.lock:
                now = monotonic()
                # new content in place: the block's earlier entries are gone (a partial
                # entry growing into a full one of the same content is no eviction)
                if _arg(args, kwargs, 5, "replace_existing_hashes", False):
                    state.on_block_unhashed(block.block_id, "replaced", now)
                if block.block_hash is not None:
                    state.on_block_hashed(block.block_id, now)
    return result


def _move_block_hashes(wrapped, pool, args, kwargs):
    wrapped(pool, *args, **kwargs)
    state = _pool_state(pool)
    if state is not None:
        with _guard:
            src = _arg(args, kwargs, 0, "src_block")
            dst = _arg(args, kwargs, 1, "dst_block")
            if _owned(pool.blocks, src) and _owned(pool.blocks, dst):
                with state.lock:
                    state.on_block_hash_moved(src.block_id, dst.block_id)


def _evict_blocks(wrapped, pool, args, kwargs):
    state = _pool_state(pool)
    if state is None:
        return wrapped(pool, *args, **kwargs)
    block_ids = _arg(args, kwargs, 0, "block_ids")
    if not isinstance(block_ids, Collection):  # only iterated by vLLM; read it twice
        block_ids = list(block_ids)
        args, kwargs = (block_ids,), {}
    state.evictions_counted_by_caller = True
    try:
        wrapped(pool, *args, **kwargs)
    finally:
        state.evictions_counted_by_caller = False
    with _guard, state.lock:
        now = monotonic()
        for block_id in block_ids:
            if block_id != NULL_BLOCK_ID and pool.blocks[block_id].block_hash is None:
                state.on_block_unhashed(block_id, "explicit", now)


def _reset_prefix_cache(wrapped, pool, args, kwargs):
    done = wrapped(pool, *args, **kwargs)
    state = _pool_state(pool)
    if done and state is not None:
        with _guard, state.lock:
            state.on_cache_reset(monotonic())
    return done


# -- KVCacheManager ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ManagerHooks:
    """What a KVCacheManager's wrappers need: its pool's state and the request
    stories (spans on)."""

    state: KVCacheState
    num_groups: int
    stories: RequestStories | None
    # a request's block peak can fall between its end points only where vLLM
    # retires blocks of live tables; elsewhere its stories catch up at the end
    settle_each_step: bool = False


def _manager_hooks(manager) -> _ManagerHooks | None:
    return getattr(manager, _STATE, None) if _guard.active else None


class _Probing(threading.local):
    """Set while the start-up probe drives its own vLLM objects: they are not exported."""

    active = False


probing = _Probing()


def _manager_init(wrapped, manager, args, kwargs):
    wrapped(manager, *args, **kwargs)
    with _guard:
        state = getattr(manager.block_pool, _STATE, None)
        if state is None:
            return
        group_managers = manager.coordinator.single_type_managers
        watch = _ManagerWatch(weakref.ref(manager))
        state.refresh_groups, state.self_check = watch.refresh_groups, watch.self_check
        state.refresh_groups()
        stories = None if probing.active else telemetry.attach(state, _engine_context.take(), _guard)
        state.follow_moves = stories is not None
        shrinking = any(type(m).__name__ not in GROWING_TABLE_MANAGERS for m in group_managers)
        setattr(manager, _STATE, _ManagerHooks(state, len(group_managers), stories, stories is not None and shrinking))


@dataclass
class _ManagerWatch:
    """What the ledger asks of its KVCacheManager, through a weak reference (the
    ledger lives on the pool; it must not keep the manager alive)."""

    manager: weakref.ref
    pools: tuple[weakref.ref, ...] = ()  # each group's pool when its tables were last attached

    def refresh_groups(self) -> bool:
        """Attach the tables of the groups that allocate from the manager's pool
        again if a group's pool changed: vLLM can move a group to another pool
        after building the manager (a HiSparse source group gets a host pool
        when the KV connector binds it). True when it did."""
        manager = self.manager()
        if manager is None:
            return False
        pool, group_managers = manager.block_pool, manager.coordinator.single_type_managers
        now = tuple(m.block_pool for m in group_managers)
        if len(now) == len(self.pools) and all(a is b() for a, b in zip(now, self.pools)):
            return False
        getattr(pool, _STATE).attach_tables(
            [_group_layout(g, m, pool) for g, m in enumerate(group_managers)],
            [m.req_to_blocks if m.block_pool is pool else {} for m in group_managers],
        )
        direct = {id(m.block_pool) for m in group_managers if _calls_evictions_directly(m)}
        for group_pool in (pool, *now):
            if not hasattr(group_pool, _STATE):
                continue
            if id(group_pool) in direct:
                _hook_pool(group_pool)
            elif group_pool is pool:  # another manager's pool keeps what its own groups need
                _unhook_pool(group_pool)
        self.pools = tuple(map(weakref.ref, now))
        return True

    def self_check(self) -> list[str]:
        manager = self.manager()
        if manager is None:
            return []
        return self_check(getattr(manager.block_pool, _STATE), manager.block_pool)


def _group_layout(group: int, group_manager, pool) -> GroupLayout:
    """How to count one group's blocks, from the manager vLLM chose for it."""
    kind = _spec_kind(group_manager.kv_cache_spec)
    manager_class = type(group_manager).__name__
    if group_manager.block_pool is not pool:
        _warn_once(f"KV-cache group {group} ({kind}) allocates from another block pool: its blocks are not counted")
    elif manager_class not in TOKEN_SLOT_MANAGERS | BLOCK_ONLY_MANAGERS:
        _warn_once(f"KV-cache group {group} ({kind}) uses {manager_class}, which this version does not know: "
                   "its held blocks are counted, its token slots are not")
    token_slots = manager_class in TOKEN_SLOT_MANAGERS and group_manager.block_pool is pool
    return GroupLayout(kind, group_manager.block_size, token_slots)


# Specs that vLLM's KVCacheSpecKind names; it files others under a parent's
# kind (R-SWA under full attention), so those are named after their class.
_KIND_NAMED_SPECS = frozenset({
    "FullAttentionSpec", "MLAAttentionSpec", "SlidingWindowSpec", "SlidingWindowMLASpec", "ChunkedLocalAttentionSpec",
    "SinkFullAttentionSpec", "MambaSpec", "EncoderOnlyAttentionSpec", "CrossAttentionSpec", "UniformTypeKVCacheSpecs",
})


def _spec_kind(spec) -> str:
    """vLLM's name for a KV-cache spec's kind ("sliding_window", "mamba", ...), or
    the spec's class in the same style ("rswa", "circular_buffer")."""
    if type(spec).__name__ in _KIND_NAMED_SPECS:
        try:
            from vllm.v1.kv_cache_interface import KVCacheSpecKind, get_kv_cache_spec_kind

            kind = get_kv_cache_spec_kind(spec)
            if kind is not KVCacheSpecKind.UNKNOWN:
                return kind.value
        except (ImportError, AttributeError, TypeError, ValueError):
            pass
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type(spec).__name__.removesuffix("Spec")).lower()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("vllm-frag-otel: %s.", message)


def _story(hooks: _ManagerHooks, request):
    if hooks.stories is None:
        return None
    return hooks.stories.get_or_open(
        request.request_id, request.num_prompt_tokens, hooks.num_groups, request.trace_headers, request.arrival_time
    )


def _original_then_tracked(name: str) -> str:
    """A forwarder's opening for hooks that report after vLLM's call: `result`,
    then `name` = what the plugin keeps on `self`, or the result straight back
    when `self` is not tracked or the plugin is off."""
    return f"""
    result = original({{arguments}})
    try:
        {name} = self._vllm_frag_otel
    except AttributeError:
        return result
    if not _guard.active:
        return result
"""


_GET_COMPUTED_BLOCKS = _Forwarder(_original_then_tracked("hooks") + """
    if hooks.stories is not None:
        _story_begins(hooks, {first})
    return result
""")


def _story_begins(hooks: _ManagerHooks, request) -> None:
    """The scheduler's first look at a request (get_computed_blocks): where its KV-cache story starts."""
    try:  # the per-request hooks contain errors with try/except: the guard's context manager is two frames
        with hooks.state.lock:
            _story(hooks, request)
    except Exception as exc:
        _guard.failed(exc)


# vLLM calls allocate_slots for every running request on every step, so the
# common path is a count and two attribute writes. Block tables are not copied
# (collection reads vLLM's own); the pool's hooks attribute the blocks that
# move meanwhile to `state.allocating`; request stories catch up at the next
# step boundary; the duration is timed for a random sample of calls
# (VLLM_FRAG_OTEL_ALLOCATION_SAMPLE_RATE).
_ALLOCATE_SLOTS = _Forwarder(_tracked_or_original("hooks") + """
    state = hooks.state
    state.allocating = request
    try:
        if state.calls_until_timed:  # counts the call too (KVCacheState.allocation_calls)
            state.calls_until_timed -= 1
            result = original({arguments})
            if result is not None:
                return result
            duration = None
        else:
            start = perf_counter()
            result = original({arguments})
            duration = perf_counter() - start
    finally:
        state.allocating = None
    _uncommon_allocation(hooks, self, request, result is not None, duration)
    return result
""")


def _uncommon_allocation(hooks: _ManagerHooks, manager, request, succeeded: bool, duration: float | None) -> None:
    """A failed or a timed allocation: counted, timed, told to the request's story."""
    state, stories = hooks.state, hooks.stories
    with _guard, state.lock:
        if duration is not None:
            state.on_timed_call()  # first: the calls are counted by gap
        story = stories.open.get(request.request_id) if stories is not None else None
        if not succeeded:
            state.allocation_failures += 1
            if story is not None:
                _settle_moves(hooks, request.request_id)  # blocks it got since its last failure end that run
                stories.allocation_failed(story, manager.block_pool.get_num_free_blocks())
        if duration is not None:
            state.buffer_allocation_duration(succeeded, duration, story.exemplar if story is not None else None)


def _settle_moves(hooks: _ManagerHooks, request_id: str | None = None) -> None:
    """Bring the stories of requests whose blocks moved (or of one request) up
    to date: peak blocks held and the cached blocks their allocations took
    over. Runs before a request gives its blocks back, so no peak is missed,
    and at each step boundary where tables can shrink while in use."""
    state, stories = hooks.state, hooks.stories
    moves = state.take_moves() if request_id is None else state.take_move(request_id)
    for moved_id, evicted in moves.items():
        story = stories.open.get(moved_id)
        if story is not None:
            stories.blocks_moved(story, state.request_blocks_held(moved_id), evicted)


def _remove_skipped_blocks(wrapped, manager, args, kwargs):
    """Outside allocate_slots (a KV connector taking a finished request's table):
    retired entries become the null block in place."""
    result = wrapped(manager, *args, **kwargs)
    hooks = _manager_hooks(manager)
    if hooks is not None:
        with _guard:
            hooks.state.on_table_edited(_arg(args, kwargs, 0, "request_id"))
    return result


_RECORD_PREFIX_CACHE_STATS = _Forwarder(_original_then_tracked("hooks") + """
    _prefix_lookup(hooks, self, request, num_hits)
    return result
""")


def _prefix_lookup(hooks: _ManagerHooks, manager, request, hits: int) -> None:
    """vLLM counts a lookup when it admits the request; so do we, whatever log_stats says."""
    try:
        with hooks.state.lock:
            if manager.prefix_cache_lookup_enabled(request):
                hooks.state.on_prefix_lookup(request.num_tokens, hits, request.num_preemptions > 0)
                story = _story(hooks, request)
                if story is not None:
                    hooks.stories.admitted(story, hits)
    except Exception as exc:
        _guard.failed(exc)


# -- Scheduler -------------------------------------------------------------------


class _EngineContext(threading.local):
    """What the Scheduler knows about its engine, handed to the KVCacheManager it builds."""

    attributes: dict[str, Any] | None = None

    def take(self) -> dict[str, Any]:
        attributes, self.attributes = self.attributes or {}, None
        return attributes


_engine_context = _EngineContext()


def _engine_attributes(vllm_config) -> dict[str, Any]:
    import vllm

    attributes: dict[str, Any] = {"service.version": vllm.__version__}
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is not None:
        names = getattr(model_config, "served_model_name", None) or model_config.model
        attributes["vllm.model.name"] = names[0] if isinstance(names, (list, tuple)) else str(names)
    parallel = getattr(vllm_config, "parallel_config", None)
    if parallel is not None:
        attributes["vllm.data_parallel.rank"] = int(getattr(parallel, "data_parallel_rank", 0))
    return attributes


def _scheduler_init(wrapped, scheduler, args, kwargs):
    with _guard:
        _engine_context.attributes = _engine_attributes(_arg(args, kwargs, 0, "vllm_config"))
    try:
        wrapped(scheduler, *args, **kwargs)
    finally:
        _engine_context.attributes = None
    hooks = _manager_hooks(scheduler.kv_cache_manager)
    if hooks is not None:
        with _guard:
            hooks.state.attach_requests(scheduler.requests)
            hooks.state.stepping_thread = threading.get_ident()  # until a step boundary says otherwise


# Blocks whose flags the self-check compares with vLLM's, per check.
SELF_CHECK_PROBES = 64
_probe_rng = random.Random()  # probes differ from check to check: a lasting drift is found


def _schedule(wrapped, scheduler, args, kwargs):
    """A step boundary: nothing of vLLM's is mid-change, so the self-check runs
    here; after it, the stories of requests whose blocks moved catch up."""
    hooks = _manager_hooks(scheduler.kv_cache_manager)
    if hooks is not None and hooks.state.check_due:
        with _guard:
            hooks.state.stepping_thread = threading.get_ident()
            hooks.state.self_check()
    output = wrapped(scheduler, *args, **kwargs)
    if hooks is not None and hooks.settle_each_step and hooks.state.moved:
        with _guard, hooks.state.lock:
            _settle_moves(hooks)
    return output


def self_check(state: KVCacheState, pool) -> list[str]:
    """Compare the ledger's block flags with the pool's, which groups use the
    pool, and a sample of the block tables as last read with vLLM's; on drift,
    count it, take every flag from the pool and read the differing tables
    again (logged once per process). Returns the differences."""
    try:
        blocks = pool.blocks
        probes = [
            (b, blocks[b].ref_cnt == 0, blocks[b].block_hash is not None)
            for b in _probe_rng.sample(range(1, len(blocks)), min(SELF_CHECK_PROBES, len(blocks) - 1))
        ]
        with state.lock:
            found = state.drift(pool.get_num_free_blocks(), probes)
            if found:
                state.resync([b.ref_cnt == 0 for b in blocks], [b.block_hash is not None for b in blocks])
        if state.groups_moved():
            found.append("a KV-cache group moved to another block pool")
        found += state.table_drift(SELF_CHECK_PROBES, _probe_rng)
    finally:
        state.check_done()
    if found:
        state.drift_repairs += 1
        _warn_drift_once(found)
    return found


_drift_logged = False


def _warn_drift_once(found: list[str]) -> None:
    global _drift_logged
    if _drift_logged:
        logger.debug("vllm-frag-otel: ledger drift repaired: %s", "; ".join(found))
        return
    _drift_logged = True
    logger.warning(
        "vllm-frag-otel: the ledger drifted from vLLM's block pool (%s); resynchronised from the pool. Later "
        "repairs are counted in vllm.frag_otel.drift, not logged. Please report this with your vLLM version.",
        "; ".join(found[:3]) + (f"; {len(found) - 3} more" if len(found) > 3 else ""),
    )


def _preempt_request(wrapped, scheduler, args, kwargs):
    hooks = _manager_hooks(scheduler.kv_cache_manager)
    if hooks is None:
        return wrapped(scheduler, *args, **kwargs)
    request = _arg(args, kwargs, 0, "request")
    blocks_held = 0
    with _guard, hooks.state.lock:
        blocks_held = hooks.state.request_blocks_held(request.request_id)
        if hooks.stories is not None:
            _settle_moves(hooks, request.request_id)  # its peak, before it gives its blocks back
    result = wrapped(scheduler, *args, **kwargs)
    with _guard, hooks.state.lock:
        hooks.state.on_preemption()
        story = _story(hooks, request)
        if story is not None:
            hooks.stories.preempted(story, blocks_held)
    return result


_FREE_REQUEST = _Forwarder("""
    try:
        hooks = self.kv_cache_manager._vllm_frag_otel
    except AttributeError:
        return original({arguments})
    if hooks.stories is None or not _guard.active:
        return original({arguments})
    slots = _story_ending(hooks, {first})
    result = original({arguments})
    _story_ended(hooks, {first}, slots)
    return result
""")


def _story_ending(hooks: _ManagerHooks, request) -> tuple[int, int]:
    """A finished or aborted request, before vLLM lets go of it: its (allocated,
    used) slots, and its peak before it gives its blocks back."""
    try:
        with hooks.state.lock:
            slots = hooks.state.request_slots(request.request_id)
            _settle_moves(hooks, request.request_id)
            return slots
    except Exception as exc:
        _guard.failed(exc)
        return (0, 0)


def _story_ended(hooks: _ManagerHooks, request, slots: tuple[int, int]) -> None:
    """Its story ends (its blocks may be freed later)."""
    try:
        with hooks.state.lock:
            status = request.status.name.lower()
            hooks.stories.finished(
                request.request_id, status, slots[0], slots[0] - slots[1], request.num_output_tokens,
                failed=("aborted" in status or "error" in status),
            )
    except Exception as exc:
        _guard.failed(exc)


def engine_stopped(scheduler, seconds: float | None = None) -> None:
    """vLLM stops the engine of `scheduler`: end its pool's open spans and, once
    every engine of this process stopped, export the last point, spans and block
    maps within `seconds` (VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT unless given). Later
    calls for the same engine do nothing."""
    with _guard:
        manager = getattr(scheduler, "kv_cache_manager", None)
        hooks = getattr(manager, _STATE, None)  # even if the guard gave up
        if hooks is not None and hooks.stories is not None and _guard.active:
            with hooks.state.lock:
                _settle_moves(hooks)  # the open spans' peaks, before they end
        telemetry.engine_stopped(hooks.state if hooks is not None else None, getattr(scheduler, "requests", None),
                                 seconds)


def _scheduler_shutdown(wrapped, scheduler, args, kwargs):
    """vLLM stops the engine: EngineCore.shutdown calls this on every graceful
    path (SIGTERM/SIGINT of the engine-core process, the API server's exit,
    an offline LLM's finalizer). The stop hooks (plugin/stop.py) flush earlier
    where they can; this covers a Scheduler stopped without its EngineCore."""
    try:
        return wrapped(scheduler, *args, **kwargs)
    finally:
        engine_stopped(scheduler)


WRAPPERS: dict[str, Callable | _Forwarder] = {
    "BlockPool.__init__": _pool_init,
    "BlockPool.get_new_blocks": _GET_NEW_BLOCKS,
    "BlockPool.touch": _TOUCH,
    "BlockPool.free_blocks": _release("on_blocks_released"),
    "BlockPool.unpin_blocks": _release("on_blocks_unpinned"),
    "BlockPool.cache_full_blocks": _CACHE_FULL_BLOCKS,
    "BlockPool.cache_partial_block": _cache_partial_block,
    "BlockPool.move_block_hashes": _move_block_hashes,
    "BlockPool.evict_blocks": _evict_blocks,
    "BlockPool.reset_prefix_cache": _reset_prefix_cache,
    "KVCacheManager.__init__": _manager_init,
    "KVCacheManager.get_computed_blocks": _GET_COMPUTED_BLOCKS,
    "KVCacheManager.allocate_slots": _ALLOCATE_SLOTS,
    "KVCacheManager.remove_skipped_blocks": _remove_skipped_blocks,
    "KVCacheManager.record_prefix_cache_stats": _RECORD_PREFIX_CACHE_STATS,
    "Scheduler.__init__": _scheduler_init,
    "Scheduler.schedule": _schedule,
    "Scheduler._preempt_request": _preempt_request,
    "Scheduler._free_request": _FREE_REQUEST,
    "Scheduler.shutdown": _scheduler_shutdown,
}


# -- instrumentor ----------------------------------------------------------------


def _hooked(original: Callable, wrapper: Callable | _Forwarder) -> Callable:
    """`original` calling through `wrapper(original, self, args, kwargs)`, or
    compiled from a `_Forwarder`.

    wrapt's calling convention, with a plain function and the unbound original:
    on this hot path a wrapt FunctionWrapper cost 0.55 us per call against
    0.24 us (measured).
    """

    if isinstance(wrapper, _Forwarder):
        hooked = functools.wraps(original)(_compile(original, wrapper))
    else:

        @functools.wraps(original)
        def hooked(self, *args, **kwargs):
            return wrapper(original, self, args, kwargs)

    hooked.__vllm_frag_otel_hook__ = True
    return hooked


def _resolve(point: HookPoint) -> tuple[type, str] | str:
    """The class and method name for a hook point, or why it cannot be hooked."""
    class_name, method = point.qualname.split(".")
    try:
        cls = getattr(importlib.import_module(point.module), class_name)
        function = cls.__dict__[method]
    except (ImportError, AttributeError, KeyError):
        return f"{point.module}.{point.qualname} is missing"
    try:
        params = list(inspect.signature(function).parameters)[1 : 1 + len(point.params)]
    except (TypeError, ValueError):
        return f"{point.module}.{point.qualname} has no readable signature"
    if tuple(params) != point.params:
        return f"{point.module}.{point.qualname} takes {tuple(params)}, expected {point.params}"
    return cls, method


class KVCacheInstrumentor:
    """Wraps and unwraps the hook points; all or nothing."""

    def __init__(self) -> None:
        self._wrapped: list[tuple[type, str]] = []
        self._warned = False

    @property
    def is_instrumented(self) -> bool:
        return bool(self._wrapped)

    def instrument(self, max_hook_errors: int = 10) -> bool:
        if self._wrapped:
            return True
        problem = self._check()
        if isinstance(problem, str):
            return self._refuse(problem)
        targets = dict(zip((point.qualname for point in HOOK_POINTS), problem))

        def hook_of(name: str, wrapper: Callable | _Forwarder) -> Callable:
            cls, method = targets[name]
            return _hooked(vars(cls)[method], wrapper)

        try:
            hooked = [(targets[name], hook_of(name, wrapper)) for name, wrapper in WRAPPERS.items()]
            per_pool = {targets[name][1]: hook_of(name, forwarder) for name, forwarder in PER_POOL_HOOKS.items()}
        except (ValueError, SyntaxError) as exc:
            return self._refuse(str(exc))
        _guard.max_errors = max_hook_errors
        _guard.active = True
        _guard.errors = 0
        _per_pool_hooks.update(per_pool)
        for (cls, method), hook in hooked:
            setattr(cls, method, hook)
            self._wrapped.append((cls, method))
        untested = _untested_version()
        if untested:
            difference = _probe_difference()
            if difference is not None:
                self.uninstrument()
                return self._refuse(
                    f"vLLM {untested} is newer than the versions this plugin is tested with ({SUPPORTED_VLLM}) and "
                    f"its KV cache does not behave as the plugin expects: {difference}"
                )
            if not self._warned:
                self._warned = True
                logger.warning(
                    "vllm-frag-otel: vLLM %s is newer than the versions this plugin is tested with (%s); every hook "
                    "point matches and a scripted run of its block pool and KV-cache manager kept the ledger exact, "
                    "so it instruments. Its self-check compares the ledger with vLLM's block pool before each "
                    "export and counts any drift in vllm.frag_otel.drift; please report drift or hook errors.",
                    untested, SUPPORTED_VLLM,
                )
        return True

    def _refuse(self, problem: str) -> bool:
        if not self._warned:
            self._warned = True
            logger.warning("vllm-frag-otel: not instrumenting vLLM: %s. vLLM runs untouched.", problem)
        return False

    def uninstrument(self) -> None:
        for cls, method in reversed(self._wrapped):
            setattr(cls, method, cls.__dict__[method].__wrapped__)
        self._wrapped.clear()
        for pool in list(_pools_hooked):
            _unhook_pool(pool)
        _per_pool_hooks.clear()

    @staticmethod
    def _check() -> list[tuple[type, str]] | str:
        try:
            import vllm
        except ImportError:
            return "vLLM is not installed in this environment"
        try:
            version = Version(vllm.__version__)
        except (InvalidVersion, AttributeError, TypeError) as exc:
            return f"cannot read the vLLM version ({exc})"
        if Version(version.base_version) < OLDEST_VLLM:
            return f"vLLM {vllm.__version__} is not supported (supported: {SUPPORTED_VLLM}, and newer ones whose hook points match)"
        resolved = []
        for point in HOOK_POINTS:
            target = _resolve(point)
            if isinstance(target, str):
                return f"vLLM {vllm.__version__}: {target}"
            resolved.append(target)
        return resolved


def _probe_difference() -> str | None:
    """The start-up probe's first difference on this vLLM, hooks on; a hook error
    it provoked is one too. Its manager starts no telemetry."""
    from vllm_frag_otel.plugin.probe import first_difference

    probing.active = True  # set here: the probe cannot import this module (an import cycle)
    try:
        difference = first_difference()
    finally:
        probing.active = False
    if difference is None and _guard.errors:
        difference = f"its hooks raised {_guard.errors} error(s) in the scripted run"
    return difference


def _untested_version() -> str | None:
    """vLLM's version if it is newer than every tested one (instrumented all the same
    when its hook points match: the self-check is the safety net)."""
    import vllm

    version = Version(Version(vllm.__version__).base_version)
    return None if version in SpecifierSet(SUPPORTED_VLLM) else vllm.__version__


instrumentor = KVCacheInstrumentor()


def analyzer_for(obj) -> KVCacheState:
    """The live state of the pool behind a Scheduler, KVCacheManager or BlockPool."""
    pool = obj
    if hasattr(pool, "kv_cache_manager"):
        pool = pool.kv_cache_manager
    if hasattr(pool, "block_pool"):
        pool = pool.block_pool
    state = getattr(pool, _STATE, None)
    if not isinstance(state, KVCacheState):
        raise ValueError(
            f"{type(obj).__name__} is not tracked by vllm-frag-otel: it was built before "
            "the plugin was loaded, or the plugin is disabled"
        )
    return state
