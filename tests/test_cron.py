"""Fire times and fire decisions, without a server: cron across daylight-saving changes,
intervals, jitter, and what each overlap policy and the catch-up window decide (the clock
is injected: ``plan`` takes the time it decides at)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from natflow import InvalidInput, workflow
from natflow_engine._cron import FireTimes, jitter_for
from natflow_engine._schedules import (
    MAX_STARTS_PER_PASS,
    STATE_ROOM,
    Schedule,
    ScheduleSpec,
    check_spec,
    fire_run_id,
    plan,
)

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_cron_in_berlin_skips_nothing_and_repeats_nothing_across_dst() -> None:
    daily = FireTimes(cron="30 2 * * *", every=None, timezone="Europe/Berlin")
    # Spring forward (29 March 2026, 02:00 -> 03:00 local): 02:30 does not exist that day and
    # fires at 03:00 CEST = 01:00 UTC; the days around it fire at 02:30 local.
    assert daily.next(utc(2026, 3, 27), 4) == [
        utc(2026, 3, 27, 1, 30),  # CET, UTC+1
        utc(2026, 3, 28, 1, 30),
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST, the first minute that exists
        utc(2026, 3, 30, 0, 30),  # CEST, UTC+2
    ]
    # Fall back (25 October 2026, 03:00 -> 02:00 local): 02:30 happens twice, fires once.
    assert daily.next(utc(2026, 10, 24), 3) == [
        utc(2026, 10, 24, 0, 30),
        utc(2026, 10, 25, 0, 30),  # the first 02:30 (CEST)
        utc(2026, 10, 26, 1, 30),  # CET again
    ]


def test_cron_with_a_wildcard_hour_keeps_real_elapsed_time_through_fall_back() -> None:
    half_hourly = FireTimes(cron="*/30 * * * *", every=None, timezone="Europe/Berlin")
    fires = half_hourly.next(utc(2026, 10, 24, 23, 50), 8)
    gaps = {b - a for a, b in itertools.pairwise(fires)}
    assert gaps == {timedelta(minutes=30)}  # the repeated local hour is fired through


def test_cron_in_new_york_and_aliases() -> None:
    ny = FireTimes(cron="@daily", every=None, timezone="America/New_York")
    # DST ends 1 November 2026: midnight is 04:00 UTC before, 05:00 UTC after.
    assert ny.next(utc(2026, 10, 31), 2) == [utc(2026, 10, 31, 4), utc(2026, 11, 1, 4)]
    assert ny.next(utc(2026, 11, 1, 12), 1) == [utc(2026, 11, 2, 5)]


def test_every_is_anchored_at_the_epoch_so_replicas_agree() -> None:
    every = FireTimes(cron=None, every=60, timezone="UTC")
    assert every.next(utc(2026, 1, 1, 0, 0, 30), 2) == [
        utc(2026, 1, 1, 0, 1),
        utc(2026, 1, 1, 0, 2),
    ]
    assert every.next(utc(2026, 1, 1, 0, 1), 1) == [utc(2026, 1, 1, 0, 2)]  # strictly after


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (ScheduleSpec(cron="61 * * * *"), "invalid cron"),
        (ScheduleSpec(cron="* * *"), "invalid cron"),
        (ScheduleSpec(every=0.5), "every must be at least"),
        (ScheduleSpec(every=1.5), "whole seconds"),
        (ScheduleSpec(cron="@daily", every=60), "exactly one"),
        (ScheduleSpec(cron="@daily", timezone="Mars/Olympus"), "unknown time zone"),
        (ScheduleSpec(every=5, overlap="sometimes"), "unknown overlap policy"),
        (ScheduleSpec(every=5, queue="a b"), "invalid queue"),
    ],
)
def test_bad_specs_are_refused_naming_the_problem(spec: ScheduleSpec, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        check_spec(spec)


def test_the_decorator_checks_the_schedule_and_event_names() -> None:
    with pytest.raises(InvalidInput, match="invalid cron"):

        @workflow(cron="every day")
        async def bad(ctx: object) -> None: ...

    with pytest.raises(InvalidInput, match="invalid event name"):

        @workflow(on_event="order created")
        async def bad2(ctx: object) -> None: ...

    @workflow(name="nightly report", cron="0 2 * * *", on_event=["a.b", "c"])
    async def good(ctx: object) -> None: ...

    assert good.schedule is not None and good.schedule.cron == "0 2 * * *"
    assert good.on_event == ("a.b", "c")
    assert good.schedule_id.startswith("nightly-report-h")  # not a token: hashed, no collision


def test_jitter_is_the_same_on_every_replica_and_within_bounds() -> None:
    delays = [jitter_for("s", T0 + timedelta(seconds=i), 5.0) for i in range(200)]
    assert all(0 <= d < 5 for d in delays)
    assert len(set(delays)) > 150
    assert delays[7] == jitter_for("s", T0 + timedelta(seconds=7), 5.0)


def schedule(overlap: str = "skip", window: float = 3600, **kw: object) -> Schedule:
    return Schedule(
        schedule_id="s",
        workflow="wf",
        spec=ScheduleSpec(every=1, overlap=overlap, catchup_window=window),
        created_at=T0,
        updated_at=T0,
        cursor=T0,
        **kw,  # type: ignore[arg-type]
    )


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_fire_is_never_decided_before_its_time() -> None:
    assert not plan(schedule(), at(0.999), set()).changed
    decided = plan(schedule(), at(1.0), set()).schedule
    assert [f.run_id for f in decided.pending] == [fire_run_id("s", at(1))]
    assert decided.cursor == at(1)


def test_catch_up_starts_fires_in_the_window_oldest_first_and_records_the_rest_missed() -> None:
    decided = plan(schedule("allow_all", window=2.5), at(6.2), set()).schedule
    # More than 2.5 s (and the pass's 1 s of tolerance) before 6.2
    assert decided.missed == [at(1), at(2)]
    assert [f.fire_time for f in decided.pending] == [at(3), at(4), at(5), at(6)]
    assert [f.action for f in decided.recent] == ["missed"] * 2 + ["started"] * 4
    assert decided.cursor == at(6)


def test_skip_drops_fires_while_the_last_run_is_open() -> None:
    s = plan(schedule("skip"), at(1), set()).schedule
    s = msgspec.structs.replace(s, pending=[])
    s = plan(s, at(2), set()).schedule  # run of fire 1 still open
    assert [f.action for f in s.recent] == ["started", "skipped"]
    s = plan(s, at(3), {fire_run_id("s", at(1))}).schedule  # it closed
    assert [f.action for f in s.recent][-1] == "started"
    assert s.open_runs == [fire_run_id("s", at(3))]


def test_buffer_one_keeps_one_fire_and_starts_it_when_the_run_closes() -> None:
    s = plan(schedule("buffer_one"), at(1), set()).schedule
    s = plan(msgspec.structs.replace(s, pending=[]), at(3), set()).schedule
    assert s.buffered == [at(2)]
    assert [f.action for f in s.recent] == ["started", "buffered", "skipped"]
    s = plan(msgspec.structs.replace(s, pending=[]), at(3.5), {fire_run_id("s", at(1))}).schedule
    assert s.buffered == []
    assert [f.run_id for f in s.pending] == [fire_run_id("s", at(2))]
    # the waiting fire goes first even when the run closed just as a new fire came due
    s = plan(schedule("buffer_one"), at(1), set()).schedule
    s = plan(msgspec.structs.replace(s, pending=[]), at(2), set()).schedule
    s = plan(msgspec.structs.replace(s, pending=[]), at(3), {fire_run_id("s", at(1))}).schedule
    assert [f.run_id for f in s.pending] == [fire_run_id("s", at(2))]
    assert s.buffered == [at(3)]


def test_buffer_all_cancel_other_and_allow_all() -> None:
    s = plan(schedule("buffer_all"), at(1), set()).schedule
    s = plan(msgspec.structs.replace(s, pending=[]), at(4), set()).schedule
    assert s.buffered == [at(2), at(3), at(4)]
    first = plan(schedule("cancel_other"), at(1), set()).schedule
    second = plan(msgspec.structs.replace(first, pending=[]), at(2), set())
    assert second.cancel == [fire_run_id("s", at(1))]
    assert second.schedule.open_runs == [fire_run_id("s", at(2))]
    every = plan(schedule("allow_all"), at(3), set()).schedule
    assert len(every.pending) == 3
    assert every.open_runs == []  # allow_all never checks them: no list that grows forever


def test_a_paused_schedule_decides_nothing() -> None:
    assert not plan(schedule(paused=True), at(10), set()).changed


def test_a_long_outage_is_counted_as_missed_without_keeping_every_fire() -> None:
    three_days = 3 * 86400
    decided = plan(schedule("allow_all", window=60), at(three_days + 0.5), set()).schedule
    assert decided.missed_count == three_days - 61  # the window, and 1 s of tolerance
    assert len(decided.missed) == 50 and decided.missed[-1] == at(three_days - 61)
    assert len(decided.recent) == 50
    assert decided.pending[0].fire_time == at(three_days - 60)
    assert len(decided.pending) == 61 and decided.cursor == at(three_days)


def test_cancel_other_catching_up_starts_the_newest_fire_and_cancels_nothing_unstarted() -> None:
    decided = plan(schedule("cancel_other"), at(3), set())
    assert decided.cancel == []
    assert [f.run_id for f in decided.schedule.pending] == [fire_run_id("s", at(3))]
    assert [f.action for f in decided.schedule.recent] == ["skipped", "skipped", "started"]
    # a run started in an earlier pass is cancelled
    later = plan(msgspec.structs.replace(decided.schedule, pending=[]), at(4), set())
    assert later.cancel == [fire_run_id("s", at(3))]


def test_a_berlin_cron_fires_on_the_spring_change_at_the_right_instant_of_a_given_clock() -> None:
    nightly = Schedule(
        schedule_id="n",
        workflow="wf",
        spec=ScheduleSpec(cron="30 2 * * *", timezone="Europe/Berlin"),
        created_at=utc(2026, 3, 28, 12),
        updated_at=utc(2026, 3, 28, 12),
        cursor=utc(2026, 3, 28, 12),
    )
    # 02:30 does not exist on 29 March 2026 in Berlin: the fire is 03:00 CEST = 01:00 UTC.
    assert not plan(nightly, utc(2026, 3, 29, 0, 59, 59), set()).changed
    fired = plan(nightly, utc(2026, 3, 29, 1, 0, 0), set()).schedule
    assert [f.run_id for f in fired.pending] == ["n-20260329T010000Z"]


def test_a_window_of_0_or_under_the_jitter_starts_every_fire_met_on_time() -> None:
    """Lateness counts from the due time (fire plus jitter): with a jitter over the window,
    or a window of 0 ("no catch-up"), fires the engine met on time were recorded missed."""
    none = plan(schedule("allow_all", window=0), at(1.3), set()).schedule
    assert [f.action for f in none.recent] == ["started"]
    jittery = Schedule(
        schedule_id="j",
        workflow="wf",
        spec=ScheduleSpec(every=2, overlap="allow_all", catchup_window=0.5, jitter=1.9),
        created_at=T0,
        updated_at=T0,
        cursor=T0,
    )
    s, started = jittery, 0
    for tick in range(1, 40):  # a pass every 0.5 s: each fire met within 0.5 s of its due
        s = plan(msgspec.structs.replace(s, pending=[]), at(tick * 0.5), set()).schedule
        started = max(started, sum(f.action == "started" for f in s.recent))
    assert s.missed_count == 0 and started >= 9


def test_a_long_catch_up_is_decided_a_bounded_number_of_starts_per_pass() -> None:
    """Three hours of an every-second allow_all schedule missed: the entry that holds each
    decided start must stay within the server's max payload (it outgrew it at once, and the
    schedule never fired again). Each pass decides a bounded batch; the next goes on."""
    now = at(3 * 3600)
    first = plan(schedule("allow_all", window=86400), now, set()).schedule
    assert len(first.pending) == MAX_STARTS_PER_PASS
    assert len(msgspec.json.encode(first)) < STATE_ROOM
    second = plan(msgspec.structs.replace(first, pending=[]), now, set()).schedule
    assert second.pending[0].fire_time == first.pending[-1].fire_time + timedelta(seconds=1)
