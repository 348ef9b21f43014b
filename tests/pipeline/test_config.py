"""RunConfig: a time budget for tuning without a trial count still tunes (the clock ends the run)."""

from __future__ import annotations

from pipeline.config import TRIALS_WITHIN_MINUTES, RunConfig


def test_a_time_budget_alone_tunes_until_the_clock_ends_it():
    assert RunConfig(model_path="m.onnx", tune_minutes=30).tune_trials == TRIALS_WITHIN_MINUTES


def test_a_trial_count_with_a_time_budget_is_kept():
    assert RunConfig(model_path="m.onnx", tune_minutes=30, tune_trials=8).tune_trials == 8


def test_no_budget_no_tuning():
    assert RunConfig(model_path="m.onnx").tune_trials == 0
