"""RunConfig: a time budget for tuning without a trial count still tunes (the clock ends the run)."""

from __future__ import annotations

from pipeline.config import TRIALS_WITHIN_MINUTES, RunConfig


def test_a_time_budget_alone_tunes_until_the_clock_ends_it():
    assert RunConfig(model_path="m.onnx", tune_minutes=30).tune_trials == TRIALS_WITHIN_MINUTES


def test_a_trial_count_with_a_time_budget_is_kept():
    assert RunConfig(model_path="m.onnx", tune_minutes=30, tune_trials=8).tune_trials == 8


def test_no_budget_no_tuning():
    assert RunConfig(model_path="m.onnx").tune_trials == 0


def test_the_run_id_keeps_only_safe_characters_of_the_file_name():
    """The run id goes into paths on the device and its commands: a model file may be named anything."""
    import re

    from pipeline.config import RunConfig

    config = RunConfig(model_path="/models/my 'best'\\model\n$(id).onnx", profile="/labs/pi `4`.yaml").with_run_id()
    assert re.fullmatch(r"[A-Za-z0-9._-]+", config.run_id), config.run_id
    assert "my__best__model__" in config.run_id and "pi__4_" in config.run_id
    assert not RunConfig(model_path="/m/.hidden.onnx").with_run_id().run_id.split("-", 2)[2].startswith(".")
