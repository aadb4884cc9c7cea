"""Each request's KV-cache story, from first lookup to final release: pure data.

The ledger records what happened to a request (hits, peak blocks, preemptions,
failed allocations) and tells a `StorySink` (the span layer) about it as it
happens. Memory is bounded: at most `max_open` stories at once; requests
beyond that are not followed, and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class RequestStory:
    request_id: str
    prompt_tokens: int
    num_groups: int
    arrival_time: float | None = None  # vLLM's Request.arrival_time: Unix seconds when the request came in
    hit_tokens: int = 0  # found in the prefix cache at first admission
    admitted: bool = False
    peak_blocks: int = 0
    preemptions: int = 0
    failed_allocations: int = 0
    failing: bool = False  # the last allocation attempt failed
    evicted_blocks: int = 0  # cached blocks its own allocations took over (their prefix-cache entries dropped)
    output_tokens: int = 0  # when it finished
    allocated_slots: int = 0  # when it finished
    unused_slots: int = 0
    finish_status: str = ""
    handle: Any = field(default=None, repr=False)  # the sink's (a span)
    exemplar: Any = field(default=None, repr=False)  # the sink's tag for measurements of this request, or None


class StorySink(Protocol):
    def opened(self, story: RequestStory, trace_headers: Any) -> None: ...

    def event(self, story: RequestStory, name: str, attributes: dict[str, Any]) -> None: ...

    def closed(self, story: RequestStory, failed: bool) -> None: ...


class RequestStories:
    """Open stories by request id; callers hold the pool's lock."""

    def __init__(self, sink: StorySink, max_open: int):
        self.sink = sink
        self.max_open = max_open
        self.open: dict[str, RequestStory] = {}
        self.not_followed = 0  # requests turned away because max_open stories were open
        self._turned_away: set[str] = set()

    def get_or_open(self, request_id: str, prompt_tokens: int, num_groups: int, trace_headers,
                    arrival_time: float | None = None) -> RequestStory | None:
        story = self.open.get(request_id)
        if story is None:
            if request_id in self._turned_away:
                return None  # no span that would miss its beginning
            if len(self.open) >= self.max_open:
                self._turned_away.add(request_id)
                self.not_followed += 1
                return None
            story = self.open[request_id] = RequestStory(request_id, prompt_tokens, num_groups, arrival_time)
            self.sink.opened(story, trace_headers)
        return story

    def admitted(self, story: RequestStory, hit_tokens: int) -> None:
        """A prefix-cache lookup at admission: the first one, or a resumption after preemption."""
        if not story.admitted:
            story.admitted = True
            story.hit_tokens = hit_tokens
        else:
            self.sink.event(story, "resumed", {"vllm.kv_cache.prefix_cache.hit_tokens": hit_tokens})

    def blocks_moved(self, story: RequestStory, blocks_held: int, evicted_blocks: int) -> None:
        """Its allocations took blocks (or gave some back): a request that failed
        needed blocks, so this also ends a run of failures."""
        story.evicted_blocks += evicted_blocks
        story.peak_blocks = max(story.peak_blocks, blocks_held)
        story.failing = False

    def allocation_failed(self, story: RequestStory, free_blocks: int) -> None:
        """Every failure is counted; a run of failures (one per scheduler step while
        the request waits for blocks) is one event, at its start."""
        story.failed_allocations += 1
        if not story.failing:
            story.failing = True
            self.sink.event(story, "allocation_failed", {"vllm.kv_cache.block.free": free_blocks})

    def preempted(self, story: RequestStory, blocks_released: int) -> None:
        story.preemptions += 1
        self.sink.event(story, "preempted", {"vllm.kv_cache.block.released": blocks_released})

    def finished(
        self, request_id: str, status: str, allocated_slots: int, unused_slots: int, output_tokens: int, failed: bool
    ) -> None:
        story = self.open.pop(request_id, None)
        if story is None:
            self._turned_away.discard(request_id)
            return
        story.finish_status = status
        story.output_tokens = output_tokens
        story.allocated_slots = allocated_slots
        story.unused_slots = unused_slots
        self.sink.closed(story, failed)
