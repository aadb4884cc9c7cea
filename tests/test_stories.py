"""The request-story ledger alone (core/stories.py), against a sink that records
what it is told: the open-story cap, turned-away requests, and what each event
carries. The span layer on top is tested with vLLM's scheduler in test_spans.py."""

from __future__ import annotations

from vllm_frag_otel.core.stories import RequestStories, RequestStory


class RecordingSink:
    def __init__(self) -> None:
        self.opened_ids: list[str] = []
        self.events: list[tuple[str, str, dict]] = []
        self.closed_ids: list[tuple[str, bool]] = []

    def opened(self, story: RequestStory, trace_headers) -> None:
        self.opened_ids.append(story.request_id)

    def event(self, story: RequestStory, name: str, attributes: dict) -> None:
        self.events.append((story.request_id, name, attributes))

    def closed(self, story: RequestStory, failed: bool) -> None:
        self.closed_ids.append((story.request_id, failed))


def _stories(max_open: int) -> tuple[RequestStories, RecordingSink]:
    sink = RecordingSink()
    return RequestStories(sink, max_open), sink


def _finish(stories: RequestStories, request_id: str) -> None:
    stories.finished(request_id, "finished_stopped", 32, 4, 10, failed=False)


def test_exactly_max_open_requests_are_followed_at_once():
    stories, sink = _stories(max_open=3)
    opened = [stories.get_or_open(f"r{i}", 100, 2, None) for i in range(4)]
    assert [s is not None for s in opened] == [True, True, True, False]
    assert sink.opened_ids == ["r0", "r1", "r2"] and stories.not_followed == 1
    assert opened[0].num_groups == 2 and opened[0].prompt_tokens == 100
    # a request turned away stays unfollowed even once there is room: its span would miss its start
    _finish(stories, "r0")
    assert stories.get_or_open("r3", 100, 2, None) is None and stories.not_followed == 1
    assert stories.get_or_open("r4", 100, 2, None) is not None


def test_a_turned_away_request_is_forgotten_when_it_finishes():
    stories, sink = _stories(max_open=1)
    stories.get_or_open("held", 10, 1, None)
    assert stories.get_or_open("away", 10, 1, None) is None
    _finish(stories, "away")  # nothing to close, and nothing kept
    _finish(stories, "held")
    assert sink.closed_ids == [("held", False)]
    # the turned-away set holds no finished request: a new request under that id is followed
    assert stories.get_or_open("away", 10, 1, None) is not None


def test_events_carry_what_happened_and_a_run_of_failures_is_one_event():
    stories, sink = _stories(max_open=4)
    story = stories.get_or_open("r", 64, 1, None)
    stories.admitted(story, hit_tokens=32)  # first admission: the hit is the story's, no event
    assert story.hit_tokens == 32 and sink.events == []
    stories.allocation_failed(story, free_blocks=3)
    stories.allocation_failed(story, free_blocks=2)  # the same run of failures
    stories.preempted(story, blocks_released=5)
    stories.admitted(story, hit_tokens=16)  # resumed after preemption
    stories.blocks_moved(story, blocks_held=6, evicted_blocks=1)  # got blocks: the run ended
    stories.allocation_failed(story, free_blocks=0)
    assert sink.events == [
        ("r", "allocation_failed", {"vllm.kv_cache.block.free": 3}),
        ("r", "preempted", {"vllm.kv_cache.block.released": 5}),
        ("r", "resumed", {"vllm.kv_cache.prefix_cache.hit_tokens": 16}),
        ("r", "allocation_failed", {"vllm.kv_cache.block.free": 0}),
    ]
    assert story.hit_tokens == 32  # a resumption's hits are not the first admission's
    assert (story.failed_allocations, story.preemptions, story.peak_blocks, story.evicted_blocks) == (3, 1, 6, 1)
