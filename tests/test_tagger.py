"""The tagger's pure parts (command, progress, results, summary, failures) and the double's CLI contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from daemon.pipeline.tagger import (
    CHARACTER_THRESHOLD,
    OnnxProbe,
    TaggerProgress,
    TaggerSetup,
    build_argv,
    failure_sentence,
    model_cached,
    read_tags,
    readiness,
    summarize,
    tagger_env,
)
from tests.tagger_double.layout import DOUBLE, REPO_FOLDER, onnx_pythonpath, write_model

FACTS = Path(__file__).parent / "fixtures" / "wd14_tagger" / "FACTS.md"
REAL_RUN = Path(__file__).parent / "fixtures" / "wd14_tagger" / "real_run.txt"


def setup_for(tmp_path: Path) -> TaggerSetup:
    return TaggerSetup(python=sys.executable, script=DOUBLE, model_dir=tmp_path / "models")


def test_the_double_has_the_real_option_set() -> None:
    """The usage block of the real --help (FACTS.md 4.2) against the double's parser."""
    facts = FACTS.read_text(encoding="utf-8")
    usage = facts[facts.index("usage: tag_images_by_wd14_tagger.py"):]
    usage = usage[:usage.index("```")]
    real = set(re.findall(r"--\w+", usage))
    help_text = subprocess.run([sys.executable, str(DOUBLE), "--help"], capture_output=True, text=True,
                               check=True).stdout
    double = set(re.findall(r"--\w+", help_text.split("\n\n")[0]))  # the usage lines, as in FACTS.md
    assert len(real) == 31 and double == real


def test_argv_is_what_the_daemon_needs(tmp_path: Path) -> None:
    setup = setup_for(tmp_path)
    argv = build_argv(setup, tmp_path / "pics", threshold=0.4)
    assert argv[:3] == [sys.executable, str(DOUBLE), str(tmp_path / "pics")]
    assert "--onnx" in argv and "--remove_underscore" in argv and "--force_download" not in argv
    assert argv[argv.index("--model_dir") + 1] == str(tmp_path / "models")
    assert argv[argv.index("--general_threshold") + 1] == "0.4"
    assert float(argv[argv.index("--character_threshold") + 1]) == CHARACTER_THRESHOLD > 1
    # half a download (the folder without its files) needs --force_download, a whole one must not get it
    (setup.model_location / ".cache").mkdir(parents=True)
    assert "--force_download" in build_argv(setup, tmp_path / "pics", threshold=0.4)
    write_model(setup.model_dir)
    assert "--force_download" not in build_argv(setup, tmp_path / "pics", threshold=0.4)


def test_argv_is_accepted_by_the_double(tmp_path: Path) -> None:
    """The double refuses what argparse refuses; the daemon's argv passes it and tags."""
    setup = setup_for(tmp_path)
    write_model(setup.model_dir)
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGB", (64, 64), (250, 250, 10)).save(pics / "001.png")
    env = {**tagger_env({"PATH": "/usr/bin:/bin"}), "PYTHONPATH": onnx_pythonpath()}
    done = subprocess.run(build_argv(setup, pics, threshold=0.35), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (pics / "001.txt").read_bytes() == b"1girl, solo, red hair, simple background, smile\n"
    assert "found 1 images." in done.stderr and "done!" in done.stderr
    bad = subprocess.run([sys.executable, str(DOUBLE), str(pics), "--threshold", "0.3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error: unrecognized arguments: --threshold" in bad.stderr


def test_double_crashes_on_character_tags_like_the_real_script(tmp_path: Path) -> None:
    setup = setup_for(tmp_path)
    write_model(setup.model_dir)
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGB", (64, 64), (10, 10, 250)).save(pics / "a.png")
    env = {**tagger_env({"PATH": "/usr/bin:/bin"}), "PYTHONPATH": onnx_pythonpath(), "TAGGER_DOUBLE_CHARACTER": "1"}
    argv = build_argv(setup, pics, threshold=0.35)
    at = argv.index("--character_threshold")
    crashed = subprocess.run(argv[:at] + argv[at + 2:], env=env, capture_output=True, text=True)
    assert crashed.returncode == 1 and "UnboundLocalError" in crashed.stderr.splitlines()[-1]
    assert subprocess.run(argv, env=env, capture_output=True, text=True).returncode == 0


def test_progress_from_real_shaped_stderr() -> None:
    progress = TaggerProgress()
    assert progress.feed("2026-11-30 19:00:00 INFO     downloading wd14 tagger model from hf_hub. id: x\n")
    assert progress.phase == "downloading"
    assert progress.feed("                    INFO     found 3 images.   tag_images_by_wd14_tagger.py:324\n")
    assert progress.phase == "tagging" and progress.batches_done == 0
    progress.feed("\r  0%|          | 0/3 [00:00<?, ?it/s]\r 33%|███▎      | 1/")  # a bar cut mid-chunk
    assert progress.batches_done == 0
    assert progress.feed("3 [00:00<00:00, 53.33it/s]")
    assert (progress.batches_done, progress.batches_total) == (1, 3)
    progress.feed("\r100%|██████████| 3/3 [00:00<00:00, 70.05it/s]\n")
    assert progress.pictures_done(3) == 3 and progress.pictures_done(2, batch_size=4) == 2


def test_progress_of_the_recorded_real_run() -> None:
    """The stderr lines recorded from the real script (real_run.txt, section 1) parse to 3 of 3."""
    text = REAL_RUN.read_text(encoding="utf-8")
    section = text[text.index("## 1."):text.index("## 2.")]
    progress = TaggerProgress()
    progress.feed(section)
    assert (progress.phase, progress.batches_done, progress.batches_total) == ("tagging", 3, 3)


def test_read_tags(tmp_path: Path) -> None:
    pics = [tmp_path / f"{i:03d}.png" for i in (1, 2, 3)]
    (tmp_path / "001.txt").write_text("1girl, solo, red hair, solo\n", encoding="utf-8")
    (tmp_path / "002.txt").write_text("\n", encoding="utf-8")
    assert read_tags(tmp_path, pics) == [["1girl", "solo", "red hair"], [], []]


def test_summary_suggests_fixed_traits_only() -> None:
    per_picture = [["1girl", "solo", "red hair", "smile", "simple background"],
                   ["1girl", "solo", "red hair", "full body"],
                   ["1girl", "red hair", "green eyes", "grey background"],
                   ["1girl", "solo", "red hair", "green eyes"]]
    summary = {t.tag: t for t in summarize(per_picture)}
    assert [t.tag for t in summarize(per_picture)][:2] == ["1girl", "red hair"]
    assert summary["red hair"].suggest_drop and summary["red hair"].count == 4
    assert not summary["green eyes"].suggest_drop  # 2 of 4 is not more than half
    assert not summary["1girl"].suggest_drop and not summary["solo"].suggest_drop
    assert not summary["smile"].suggest_drop
    assert [t.suggest_drop for t in summarize([["red hair"]])] == [False]  # one picture: no "most"


@pytest.mark.parametrize(("last", "says"), [
    ("ValueError: Force download failed due to the above error.", "not downloaded yet"),
    ("ValueError: Cannot pass 'force_download=True' when offline mode is enabled.", "not downloaded yet"),
    ("Exception: onnx model not found: /m/model.onnx, please redownload the model with --force_download / x",
     "download is incomplete"),
    ("ModuleNotFoundError: No module named 'onnx'", "lacks onnx/onnxruntime"),
    ("UnboundLocalError: cannot access local variable 'character_tags' where it is not associated with a value",
     "character tag"),
    ("RuntimeError: something else", "exit code 1: RuntimeError: something else"),
])
def test_failure_sentences(last: str, says: str) -> None:
    assert says in failure_sentence(1, ["Traceback (most recent call last):", last, ""])


def test_model_cached_needs_both_files(tmp_path: Path) -> None:
    location = write_model(tmp_path)
    assert location.name == REPO_FOLDER and model_cached(location)
    (location / "selected_tags.csv").unlink()
    assert not model_cached(location)


def test_onnx_probe_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", onnx_pythonpath())
    probe = OnnxProbe()
    assert readiness(setup_for(tmp_path), probe).available
    python = tmp_path / "python"
    python.symlink_to(sys.executable)
    assert probe.problem(str(python)) is None
    python.unlink()  # a yes is remembered: no second subprocess
    assert probe.problem(str(python)) is None
    assert probe.problem(str(python), refresh=True) is not None  # asked again: it cannot run any more
