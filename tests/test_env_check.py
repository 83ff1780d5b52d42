"""/config/test's checks, with the real GPU probe run in a real interpreter."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from daemon.pipeline.env_check import check_gpu, check_launcher, check_tokenizer, probe_gpu, run_checks
from tests.helpers import make_config


def test_probe_runs_in_the_kohya_python_and_reports_missing_torch() -> None:
    info = probe_gpu(sys.executable)  # the test venv has no torch
    assert info.ran and not info.cuda
    assert info.error and "torch" in info.error


def test_probe_of_a_python_that_cannot_run(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("not a program")
    os.chmod(fake, 0o755)
    info = probe_gpu(str(fake))
    assert not info.ran and not info.cuda and "probe failed" in (info.error or "")


def test_launcher_check_fails_when_the_python_does_not_run(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("not a program")
    os.chmod(fake, 0o755)
    cfg = make_config(tmp_path, port=9131, kohya={"python": str(fake)})
    check = check_launcher(cfg, probe_gpu(str(fake)))
    assert not check.ok and "could not be run" in check.detail and check.fix
    good = make_config(tmp_path, port=9131)
    assert check_launcher(good, probe_gpu(sys.executable)).ok


def test_gpu_check_depends_on_allow_cpu(tmp_path: Path) -> None:
    info = probe_gpu(sys.executable)
    assert check_gpu(info, allow_cpu=True).ok
    refused = check_gpu(info, allow_cpu=False)
    assert not refused.ok and "allow_cpu" in refused.fix


def test_tokenizer_cache_must_hold_the_clip_folder(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, port=9131, kohya={"tokenizer_cache_dir": str(tmp_path / "tok")})
    assert not check_tokenizer(cfg).ok
    (tmp_path / "tok" / "openai_clip-vit-large-patch14").mkdir(parents=True)
    assert check_tokenizer(cfg).ok


def test_every_failing_check_has_a_fix(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, port=9131, allow_cpu=False, base_model=str(tmp_path / "gone.safetensors"),
                      kohya={"script_path": str(tmp_path / "no" / "train_network.py"),
                             "workspace": str(tmp_path / "no"), "python": str(tmp_path / "nopython")})
    checks = run_checks(cfg, probe_gpu(str(tmp_path / "nopython")))
    failing = [c for c in checks if not c.ok]
    assert {c.name for c in failing} == {"kohya_script", "kohya_workspace", "launcher", "base_model", "gpu"}
    assert all(c.fix for c in failing)
