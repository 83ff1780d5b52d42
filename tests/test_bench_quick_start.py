"""bench/quick_start.py (issue 9 §3): its CLI, how it reads the daemon's frames and how it sums up runs."""

from __future__ import annotations

import argparse

import pytest

from bench.quick_start import RunResult, build_parser, first_step_at, mode_settings, parse_modes, summarize, table

REQUIRED = ["--kohya-sd", "/sd", "--kohya-python", "/py", "--model", "/m.safetensors", "--tokenizer-cache", "/tok"]


def test_cli_defaults_and_modes() -> None:
    args = build_parser().parse_args(REQUIRED)
    assert args.modes == ["off", "on"] and args.repeats == 2 and args.cold is True and args.out is None
    args = build_parser().parse_args([*REQUIRED, "--modes", "off,warm,prestart,on", "--repeats", "3", "--no-cold",
                                      "--budget-s", "420", "--out", "r.json", "--data", "/d"])
    assert args.modes == ["off", "warm", "prestart", "on"] and args.repeats == 3 and args.cold is False
    assert args.budget_s == 420 and args.out == "r.json" and args.data == "/d"


@pytest.mark.parametrize("bad", ["", "off,fast", "on,on", "warm+fast"])
def test_bad_modes_are_refused(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_modes(bad)


def test_mode_settings() -> None:
    assert mode_settings("off") == (False, None)
    assert mode_settings("on") == (True, None)
    assert mode_settings("prestart") == (True, "prestart")
    assert mode_settings("warm+prestart") == (True, "warm,prestart")
    assert parse_modes("off, warm+prestart ,on") == ["off", "warm+prestart", "on"]


def test_first_step_is_the_first_progress_frame_past_step_zero() -> None:
    assert not first_step_at({"type": "progress", "data": {"step": 0, "total": 4}})
    assert not first_step_at({"type": "state", "data": {"state": "training"}})
    assert first_step_at({"type": "progress", "data": {"step": 1, "total": 4}})


def test_summary_medians_and_ratios_against_the_first_mode() -> None:
    runs = [RunResult("off", 1, first_step_s=20.0, training_s=1.0), RunResult("on", 1, first_step_s=15.0),
            RunResult("off", 2, first_step_s=22.0, training_s=3.0), RunResult("on", 2, first_step_s=13.0),
            RunResult("on", 3, error="no first step")]
    s = summarize(runs, ["off", "on"])
    assert s["off"]["median_s"] == 21.0 and s["off"]["ratio"] == 1.0 and s["off"]["median_to_training_s"] == 2.0
    assert s["on"]["runs"] == [15.0, 13.0] and s["on"]["median_s"] == 14.0
    assert s["on"]["ratio"] == pytest.approx(14 / 21) and s["on"]["saved_s"] == 7.0
    text = table(s)
    assert "| on | 15.00, 13.00 | 14.00 | ×0.67 | 7.00 | - |" in text
    assert text.splitlines()[0].startswith("| mode | click → first step")


def test_a_mode_without_a_finished_run_has_no_ratio() -> None:
    s = summarize([RunResult("off", 1, first_step_s=10.0), RunResult("on", 1, error="boom")], ["off", "on"])
    assert s["on"]["median_s"] is None and s["on"]["ratio"] is None
    assert "| on | - | - | - | - | - |" in table(s)


def test_kohya_phase_lines_are_timed_once_and_tabled() -> None:
    from bench.quick_start import mark_lines, phase_table

    marks: dict[str, float] = {}
    mark_lines(marks, ["INFO load tokenizer from cache: /tok", "other"], 4.5)
    mark_lines(marks, ["Using v1 tokenizer", "INFO loading model for process 0/1"], 5.0)
    assert marks == {"python + imports (torch, diffusers, transformers, bitsandbytes...)": 4.5,
                     "tokenizer + dataset scan + Accelerator()": 5.0}
    runs = [RunResult("off", 1, marks=marks), RunResult("off", 2, marks={**marks, "tokenizer + dataset scan + "
                                                                        "Accelerator()": 6.0})]
    text = phase_table(runs, ["off", "on"])
    assert "| python + imports (torch, diffusers, transformers, bitsandbytes...) | 4.50 | - |" in text
    assert "| tokenizer + dataset scan + Accelerator() | 5.50 | - |" in text
