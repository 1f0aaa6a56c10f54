"""The adapter's pure policies, without sockets: the busy-poll window and flow control."""

from __future__ import annotations

import pytest

from nbdserver.policy import POLL_GROW_START_NS, FlowControl, PollWindow

MAX = 50_000  # a --poll-us 50 window, in ns
US = 1000

# (waits between reply and next request in ns, window after each)
ADAPT_TABLE = [
    # Fast clients grow the window from the start value by doubling, up to the maximum.
    ([5 * US], [POLL_GROW_START_NS]),
    ([5 * US, 5 * US, 5 * US, 5 * US], [10_000, 20_000, 40_000, 50_000]),
    # A wait exactly as long as the maximum still counts as covered.
    ([MAX], [POLL_GROW_START_NS]),
    # A slow client halves it, and below the start value it drops to zero.
    ([5 * US, 5 * US, 5 * US, MAX + 1], [10_000, 20_000, 40_000, 20_000]),
    ([5 * US, MAX + 1], [10_000, 0]),
    ([MAX + 1, MAX + 1], [0, 0]),
]


@pytest.mark.parametrize(("waits", "windows"), ADAPT_TABLE)
def test_poll_window_adapts(waits: list[int], windows: list[int]) -> None:
    window = PollWindow(MAX)
    seen = []
    for waited in waits:
        window.adapt(waited)
        seen.append(window.window)
    assert seen == windows


def test_poll_window_measures_only_waits_it_was_told_about() -> None:
    window = PollWindow(MAX)
    window.arrived(now=1_000_000)  # no wait recorded: nothing to learn
    assert window.window == 0
    window.waiting(now=1_000_000)
    window.arrived(now=1_000_000 + 3 * US)  # came 3 us later: grow
    assert window.window == POLL_GROW_START_NS
    window.arrived(now=9_000_000)  # the same wait is not counted twice
    assert window.window == POLL_GROW_START_NS
    window.waiting(now=10_000_000)
    window.forget()  # polling was not allowed: the wait says nothing about the client
    window.arrived(now=90_000_000)
    assert window.window == POLL_GROW_START_NS


def test_poll_window_disabled_never_grows() -> None:
    window = PollWindow(0)
    window.adapt(0)
    assert window.window == 0


def test_flow_control_budget_and_pause_rule() -> None:
    flow = FlowControl(max_requests=2, max_bytes=1000)
    assert flow.budget(queued=300) == 700
    assert not flow.should_pause(queued=1000, draining=False)  # at the bound: fine
    assert flow.should_pause(queued=1001, draining=False)  # past it: pause
    assert flow.should_pause(queued=0, draining=True)
    flow.hold(400)
    assert (flow.requests, flow.held, flow.peak) == (1, 400, 400)
    assert flow.budget(queued=300) == 300
    assert flow.should_pause(queued=601, draining=False)
    flow.hold(0)
    assert flow.should_pause(queued=0, draining=False)  # max_requests jobs outstanding
    assert flow.budget(queued=0) == -1
    flow.release(0)
    assert flow.budget(queued=0) == 600
    flow.queued(500)
    assert flow.peak == 900
    flow.release(400)
    assert (flow.requests, flow.held, flow.peak) == (0, 0, 900)
    flow.write_paused = True
    assert flow.should_pause(queued=0, draining=False)
    assert flow.budget(queued=0) == -1
