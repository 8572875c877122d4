"""The learning-rate schedule: warm-up, cosine to the floor, and a horizon that follows the data."""
import pytest

from trainer.step import lr_factor, run_progress


def test_cosine_warms_up_decays_to_the_floor_and_stays():
    assert lr_factor(0.0, 0.05, 0.1) == pytest.approx(0.01)
    assert lr_factor(0.05, 0.05, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.525, 0.05, 0.1) == pytest.approx(0.55)
    assert lr_factor(1.0, 0.05, 0.1) == pytest.approx(0.1) == lr_factor(3.0, 0.05, 0.1)


def test_passes_over_the_held_positives_end_the_schedule_before_a_long_budget():
    # 100 steps of 512 over 10,240 held positives: 5 passes, half of a 10-pass horizon, at 1% of the budget
    assert run_progress(100, None, 6.0, 600.0, 512, 10_240, 10.0) == pytest.approx(0.5)
    assert run_progress(100, None, 6.0, 600.0, 512, 10_240, None) == pytest.approx(0.01)
    # fresh positives lower the count of passes: the rate rises again with new data
    assert run_progress(100, None, 6.0, 600.0, 512, 51_200, 10.0) == pytest.approx(0.1)
    # whichever is furthest: here the step cap
    assert run_progress(100, 120, 6.0, 600.0, 512, 51_200, 10.0) == pytest.approx(100 / 120)
    assert run_progress(0, None, 0.0, None, 512, 0, 10.0) == 0.0
