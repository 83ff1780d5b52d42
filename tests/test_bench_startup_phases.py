"""bench/startup_phases.py (issue 9 §3 research tool) reads a recorded real-kohya capture into its phase table."""

from __future__ import annotations

from pathlib import Path

from bench.startup_phases import MARKERS, main, marker_times, phases

RUN = Path(__file__).parent / "fixtures" / "kohya_startup" / "runs" / "r2_base_cold3"


def test_phases_of_a_recorded_run() -> None:
    ends = marker_times(RUN)
    assert all(t is not None for t in ends)  # every marker of the single-file path is found
    assert ends == sorted(ends)  # in kohya's order
    secs = phases(RUN)
    assert len(secs) == len(MARKERS)
    assert abs(sum(s for s in secs if s is not None) - ends[-1]) < 0.05  # the rows add up to launch → first step


def test_prints_a_markdown_table(capsys) -> None:
    assert main([str(RUN)]) == 0
    out = capsys.readouterr().out
    assert "| **launch → 'steps:' bar** | 24.73 |" in out
