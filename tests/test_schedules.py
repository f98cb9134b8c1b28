"""λ schedules and the guidance controller."""

import json
import warnings

import pytest

from prodsample.controller import GuidanceController
from prodsample.schedules import (
    Adaptive,
    Constant,
    Cosine,
    Exponential,
    Linear,
    Piecewise,
    PromptRecord,
    schedule_from_dict,
)

ANNEALED = [Linear(0.5, 100), Cosine(0.3, 100, begin_step=10), Exponential(0.5, 100, rate=3.0)]
ALL = ANNEALED + [Constant(0.5, end_step=100), Piecewise(((0, 0.5), (40, 0.8), (100, 1.0))), Adaptive(Linear(0.5, 100))]


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: type(s).__name__)
def test_reaches_one_by_the_end_and_stays(schedule):
    assert schedule.end_step == 100
    assert all(schedule.value(step) == 1.0 for step in range(100, 400, 7))
    assert all(0.0 <= schedule.value(step) <= 1.0 for step in range(0, 100))


@pytest.mark.parametrize("schedule", ANNEALED, ids=lambda s: type(s).__name__)
def test_annealed_schedules_start_at_start_and_never_decrease(schedule):
    values = [schedule.value(step) for step in range(0, 120)]
    assert values[0] == schedule.start
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_shapes():
    assert Linear(0.5, 100).value(50) == pytest.approx(0.75)
    assert Cosine(0.5, 100).value(50) == pytest.approx(0.75)
    assert Cosine(0.5, 100).value(10) < Linear(0.5, 100).value(10)
    assert Exponential(0.5, 100).value(10) > Linear(0.5, 100).value(10)
    assert Piecewise(((0, 0.5), (40, 0.8), (100, 1.0))).value(20) == pytest.approx(0.65)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: type(s).__name__)
def test_round_trips_through_json(schedule):
    restored = schedule_from_dict(json.loads(json.dumps(schedule.to_dict())))
    assert restored == schedule
    assert [restored.value(s) for s in range(0, 150, 5)] == [schedule.value(s) for s in range(0, 150, 5)]


def test_schedules_that_never_reach_one_warn():
    with pytest.warns(UserWarning, match="never reaches lam = 1"):
        Constant(0.5)
    with pytest.warns(UserWarning, match="never reaches lam = 1"):
        Piecewise(((0, 0.5), (100, 0.9)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Constant(1.0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Linear(1.5, 10), r"start must lie in \[0, 1\]"),
        (lambda: Linear(0.5, 10, begin_step=10), "begin_step < end_step"),
        (lambda: Piecewise(((10, 0.5), (5, 1.0))), "strictly increasing"),
        (lambda: Adaptive(Linear(0.5, 10), mode="sometimes"), "mode must be"),
        (lambda: schedule_from_dict({"kind": "spiral"}), "unknown schedule kind"),
        (lambda: GuidanceController("linear"), "must be a prodsample.schedules.Schedule"),
    ],
)
def test_bad_schedules(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_adaptive_history_guides_only_prompts_that_need_it():
    schedule = Adaptive(Linear(0.5, 100), mode="history", solved_rate=0.0, release_rate=0.5)
    records = [
        None,  # unseen: guided
        PromptRecord(lam=1.0, success_rate=0.25, step=3),  # solved plain: no hint
        PromptRecord(lam=1.0, success_rate=0.0, step=3),  # failed plain: guided
        PromptRecord(lam=0.6, success_rate=0.75, step=3),  # doing well guided: released
        PromptRecord(lam=0.6, success_rate=0.25, step=3),  # still struggling: guided
    ]
    assert schedule.group_lambdas(20, records) == [0.6, 1.0, 0.6, 1.0, 0.6]
    assert schedule.group_lambdas(100, records) == [1.0] * 5


def test_controller_records_checkpoints_and_resumes():
    controller = GuidanceController(Adaptive(Linear(0.5, 10)))
    assert controller.lambdas(0, ["a", "b"]) == [0.5, 0.5]
    controller.record(0, ["a", "b"], [0.5, 0.5], [[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    restored = GuidanceController.from_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.lambdas(5, ["a", "b", "c"]) == controller.lambdas(5, ["a", "b", "c"]) == [1.0, 0.75, 0.75]


def test_probe_mode_resamples_only_failed_groups():
    controller = GuidanceController(Adaptive(Linear(0.5, 10), mode="probe"))
    assert controller.probes and controller.lambdas(2, ["a", "b"]) == [1.0, 1.0]
    assert controller.followup_lambdas(2, [[0.0, 0.0], [1.0, 0.0]]) == [pytest.approx(0.6), None]
    assert controller.followup_lambdas(10, [[0.0, 0.0]]) == [None]


def test_record_checks_lengths():
    with pytest.raises(ValueError, match="one entry per group"):
        GuidanceController(Linear(0.5, 10)).record(0, ["a"], [0.5, 0.5], [[1.0]])
