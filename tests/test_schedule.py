"""The time-budget planner and throughput bookkeeping shared by the detectors."""

from __future__ import annotations

from surfaceinspect.detectors.schedule import Throughput, TimeBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(budget: TimeBudget, clock: FakeClock, monkeypatch, step_s: float, planned: int) -> int:
    """Simulate steps of ``step_s`` seconds until the planner's total is reached."""
    monkeypatch.setattr("surfaceinspect.detectors.schedule.time.monotonic", clock)
    step, total = 0, planned
    while step < total:
        clock.now += step_s
        step += 1
        total = budget.update(step, total)
    return step


def test_no_budget_keeps_the_plan(monkeypatch) -> None:
    clock = FakeClock()
    assert run(TimeBudget(0.0, 500, clock), clock, monkeypatch, 1.0, 500) == 500


def test_budget_shortens_to_fit(monkeypatch) -> None:
    clock = FakeClock()
    steps = run(TimeBudget(100.0, 10_000, clock), clock, monkeypatch, 1.0, 10_000)
    assert 90 <= steps <= 100  # 95 % of the budget at 1 s per step, never beyond it


def test_budget_never_exceeds_the_plan(monkeypatch) -> None:
    clock = FakeClock()
    assert run(TimeBudget(1e6, 40, clock), clock, monkeypatch, 1.0, 40) == 40


def test_budget_counts_time_before_a_resume(monkeypatch) -> None:
    clock = FakeClock()
    before = 60.0
    steps = run(TimeBudget(100.0, 10_000, lambda: before + clock()), clock, monkeypatch, 1.0, 10_000)
    assert 30 <= steps <= 36


def test_granularity_keeps_whole_units(monkeypatch) -> None:
    clock = FakeClock()
    budget = TimeBudget(100.0, 20 * 7, clock, granularity=7)
    steps = run(budget, clock, monkeypatch, 1.0, 140)
    assert steps % 7 == 0 and 84 <= steps <= 98
    expected = f"schedule set to {steps // 7} of 20 planned epochs to fit the time budget"
    assert budget.note(steps, "epochs", 7) == expected


def test_budget_follows_a_slower_machine(monkeypatch) -> None:
    """A step time that triples half-way shrinks the schedule again."""
    clock = FakeClock()
    monkeypatch.setattr("surfaceinspect.detectors.schedule.time.monotonic", clock)
    budget = TimeBudget(100.0, 10_000, clock)
    step, total = 0, 10_000
    while step < total:
        clock.now += 1.0 if step < 40 else 3.0
        step += 1
        total = budget.update(step, total)
    assert clock.now <= 100.0 and step < 70


def test_throughput_rates(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("surfaceinspect.detectors.schedule.time.monotonic", clock)
    meter = Throughput(steps_per_epoch=4, one_off_s=2.0)
    for _ in range(8):
        clock.now += 0.5
        meter.step_done(8)
    rates = meter.rates()
    assert rates["images_per_s"] == 16.0  # 64 images in 4 s
    assert rates["images_per_s_first_epoch"] == 8.0  # 32 images in 2 s + 2 s one-off
    assert rates["images_per_s_later_epochs"] == 16.0


def test_training_loop_counts_reports_checkpoints_and_pauses():
    import pytest

    from surfaceinspect.detectors.base import TrainContext, TrainingPaused
    from surfaceinspect.detectors.loop import StepOutcome, TrainingLoop

    reports, saved = [], []
    context = TrainContext(on_progress=reports.append, on_checkpoint=saved.append, checkpoint_every_s=0.0)
    loop = TrainingLoop(context, TimeBudget(0, 5, context.elapsed_s), Throughput(2), step=1, total=5)
    losses = iter([0.5, 0.4, 0.3, 0.2])
    loop.run(lambda: StepOutcome(next(losses), 4), lambda: {"step": loop.step}, lambda: ({"k": 1.0}, False))
    assert (loop.step, loop.total, loop.loss, loop.meter.images) == (5, 5, 0.2, 16)
    assert [(r.step, r.total, r.loss) for r in reports] == [(1, 5, None), (2, 5, 0.5), (3, 5, 0.4), (4, 5, 0.3),
                                                             (5, 5, 0.2)]  # fmt: skip
    assert reports[-1].info == {"k": 1.0} and [s["step"] for s in saved] == [1, 2, 3, 4, 5]

    paused = TrainContext(on_checkpoint=saved.append, pause_at_step=2)
    loop = TrainingLoop(paused, TimeBudget(0, 5, paused.elapsed_s), Throughput(2), step=0, total=5)
    with pytest.raises(TrainingPaused):
        loop.run(lambda: StepOutcome(1.0, 1), lambda: {"step": loop.step})
    assert loop.step == 2 and saved[-1] == {"step": 2}

    early = TrainingLoop(TrainContext(), TimeBudget(0, 5, paused.elapsed_s), Throughput(2), step=0, total=5)
    early.run(lambda: StepOutcome(1.0, 1), dict, lambda: ({}, early.step == 3))
    assert early.step == 3
