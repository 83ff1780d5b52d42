"""The GPU benchmark's own logic (bench/gpu_fit): rates, the sweep's rules, the hand-run argv, its output reader,
and one hand run end to end against the kohya test double. The numbers themselves come from running it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from bench.gpu_fit.auto import AutoJob, run_auto
from bench.gpu_fit.cli import check_prerequisites, main, parse_args
from bench.gpu_fit.hand import HandJob, OutputWatch, dataset_document, hand_argv, hand_params, run_hand
from bench.gpu_fit.measure import (
    ERROR,
    OK,
    OOM,
    StepSample,
    SweepPoint,
    best_point,
    fits_budget,
    parse_batches,
    peak_between,
    steady_rate,
    sweep_stop_reason,
    warmup_steps,
)
from bench.gpu_fit.report import table, verdicts
from tests.helpers import picture_bytes, write_sd1_checkpoint
from tests.tokenizer_files import write_tokenizer

REPO = Path(__file__).resolve().parents[1]
DOUBLE = REPO / "tests" / "kohya_double"
LOGS_DIR = REPO.parent / "shared" / "kohya-logs"


@pytest.fixture(autouse=True)
def no_kohya_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench reads its inputs from these too; a machine set up for the opt-in real-kohya test has them."""
    for name in ("KOHYA_SD", "KOHYA_PYTHON", "KOHYA_MODEL", "KOHYA_SDXL_MODEL", "KOHYA_TOKENIZER_CACHE"):
        monkeypatch.delenv(name, raising=False)


# --- rates ------------------------------------------------------------------------------------------


def test_steady_rate_leaves_out_the_warm_up_and_the_previews() -> None:
    # One step a second, except a slow first step (start-up) and a 30 s preview between steps 6 and 7.
    samples = [StepSample(10.0, 1)] + [StepSample(10.0 + n, n) for n in range(2, 7)]
    samples += [StepSample(16.5, 6, "preview"), StepSample(46.0, 7, "preview"), StepSample(47.0, 8)]
    samples += [StepSample(47.0 + n, 8 + n) for n in range(1, 5)]
    samples.insert(3, StepSample(12.5, 3))  # a second redraw of step 3 (tqdm postfix): its first arrival counts
    assert steady_rate(samples, warmup=2) == pytest.approx(1.0)
    # Counting the preview's interval would give (12 - 2) / (51 - 12) steps/s.
    assert steady_rate([StepSample(s.t, s.step) for s in samples], warmup=2) < 0.3


def test_steady_rate_needs_an_interval() -> None:
    assert steady_rate([], warmup=1) is None
    assert steady_rate([StepSample(1.0, 1)], warmup=1) is None
    assert steady_rate([StepSample(1.0, 1), StepSample(3.0, 2)], warmup=1) == pytest.approx(0.5)


@pytest.mark.parametrize(("total", "expected"), [(2, 1), (6, 5), (30, 5), (63, 6), (1000, 100)])
def test_warmup_leaves_at_least_one_interval(total: int, expected: int) -> None:
    assert warmup_steps(total) == expected


def test_peak_between_only_counts_samples_in_the_window() -> None:
    samples = [(1.0, 500), (2.0, 9000), (3.0, 4000), (4.0, 7000)]
    assert peak_between(samples, 2.5, 4.0) == 7000
    assert peak_between(samples, 5.0, 6.0) is None


# --- the sweep ----------------------------------------------------------------------------------------


def point(batch: int, ips: float | None, outcome: str = OK) -> SweepPoint:
    return SweepPoint(batch=batch, outcome=outcome, images_per_s=ips, steps_per_s=ips / batch if ips else None)


def test_sweep_goes_on_while_images_per_second_rise() -> None:
    assert sweep_stop_reason([point(1, 3.6), point(2, 6.9), point(4, 12.5)], stop_when_slower=True) is None


def test_sweep_stops_at_out_of_memory_at_an_error_and_past_the_peak() -> None:
    assert sweep_stop_reason([point(32, 55.0), point(48, None, OOM)], stop_when_slower=True) == \
        "out of memory at batch 48"
    assert "ended with error" in sweep_stop_reason([point(1, None, ERROR)], stop_when_slower=True)
    slower = [point(16, 37.0), point(32, 55.0), point(48, 54.0)]
    assert sweep_stop_reason(slower, stop_when_slower=True).startswith("batch 48 was slower than batch 32")
    assert sweep_stop_reason(slower, stop_when_slower=False) is None


def test_best_point_is_the_fastest_successful_run() -> None:
    points = [point(8, 18.7), point(16, 37.0), point(32, 55.0), point(48, None, OOM)]
    best = best_point(points)
    assert best is not None and best.batch == 32
    assert best_point([point(1, None, ERROR)]) is None


def test_budget_guesses_from_the_longest_run() -> None:
    assert fits_budget(None, [], first_guess_s=60)
    assert fits_budget(80, [], first_guess_s=60) and not fits_budget(70, [], first_guess_s=60)
    assert not fits_budget(100, [40.0, 90.0], first_guess_s=60)


@pytest.mark.parametrize("text", ["2,1", "1,1,2", "0,1", "a,b", ""])
def test_batches_must_be_ascending_positive_whole_numbers(text: str) -> None:
    with pytest.raises(ValueError, match="batch sizes"):
        parse_batches(text)


def test_batches_parse() -> None:
    assert parse_batches("1, 2,4,64") == [1, 2, 4, 64]


# --- verdicts and the table -------------------------------------------------------------------------


def test_goals_are_judged_on_a_gpu_run_only() -> None:
    auto = {"steady_images_per_s": 52.0, "click_to_lora_s": 95.0}
    best = {"batch": 32, "images_per_s": 54.0}
    v = verdicts("sd15", auto, best, gpu_name="NVIDIA H200", smoke=False)
    assert v["auto_over_hand"] == pytest.approx(52 / 54)
    assert v["ratio_verdict"] == "met" and v["click_to_lora_verdict"] == "missed"
    # The click → LoRA goal is for an H100/H200; the ratio goal holds on any card.
    other = verdicts("sd15", auto, best, gpu_name="NVIDIA GeForce RTX 4090", smoke=False)
    assert other["ratio_verdict"] == "met" and other["click_to_lora_verdict"] == "not judged"
    smoke = verdicts("sd15", auto, best, gpu_name=None, smoke=True)
    assert smoke["ratio_verdict"] == "not judged" and smoke["click_to_lora_verdict"] == "not judged"
    assert verdicts("sdxl", {}, None, gpu_name="NVIDIA H100 80GB HBM3", smoke=False)["ratio_verdict"] == \
        "not measured"


def test_table_marks_the_best_hand_run_and_says_why_the_sweep_stopped() -> None:
    report = {"models": {"sd15": {
        "auto": {"state": "done", "memory_tier": "40gb", "batch_size": 16, "mixed_precision": "bf16",
                 "steady_steps_per_s": 2.9, "steady_images_per_s": 46.4, "first_step_s": 30.1,
                 "click_to_lora_s": 80.2, "peak_mib": 21000},
        "hand": {"runs": [{"batch": 16, "outcome": OK, "steps_per_s": 2.31, "images_per_s": 37.0},
                          {"batch": 32, "outcome": OK, "steps_per_s": 1.72, "images_per_s": 55.0},
                          {"batch": 48, "outcome": OOM, "note": "CUDA out of memory"}],
                 "best": {"batch": 32, "images_per_s": 55.0}, "stopped": "out of memory at batch 48"},
        "verdicts": verdicts("sd15", {"steady_images_per_s": 46.4, "click_to_lora_s": 80.2},
                             {"images_per_s": 55.0}, gpu_name="NVIDIA H100", smoke=False),
    }}}
    text = table(report)
    assert "| sd15 | daemon, automatic (tier 40gb, bf16) | 16 | 2.90 | 46.4 | 30.1 s | 80.2 s | 21000 | done |" in text
    assert "| sd15 | kohya by hand (best) | 32 | 1.72 | 55.0 |" in text
    assert "| sd15 | kohya by hand | 48 | — | — | — | — | — | oom: CUDA out of memory |" in text
    assert "= 0.844 (goal >= 0.95: missed); sweep stopped: out of memory at batch 48" in text
    assert "click → LoRA 80.2 s (goal <= 90 s on an H100/H200: met)" in text


# --- the hand runs ------------------------------------------------------------------------------------


def job(tmp_path: Path, arch: str = "sd1", *, cpu: bool = False, te_lr: float = 5e-5, steps: int = 6) -> HandJob:
    return HandJob(arch=arch, sd_scripts=str(DOUBLE), python=sys.executable,
                   model=str(write_sd1_checkpoint(tmp_path / "model.safetensors")),
                   tokenizer_cache=str(tmp_path / "tok"), dataset_config=str(tmp_path / "dataset.toml"),
                   network_dim=32, network_alpha=16.0, unet_lr=1e-4, text_encoder_lr=te_lr, optimizer="AdamW",
                   steps=steps, cpu=cpu)


def test_hand_flags_are_the_fast_ones(tmp_path: Path) -> None:
    argv = hand_argv(job(tmp_path), batch=32, output_dir="/o", output_name="x")
    assert argv[2] == str(DOUBLE / "train_network.py")
    for flags in (["--mixed_precision", "bf16"], ["--sdpa"], ["--cache_latents"], ["--train_batch_size", "32"],
                  ["--max_train_steps", "6"], ["--text_encoder_lr", "5e-05"], ["--max_data_loader_n_workers", "0"]):
        i = argv.index(flags[0])
        assert argv[i:i + len(flags)] == flags
    assert "--gradient_checkpointing" not in argv and "--cache_text_encoder_outputs" not in argv
    xl = hand_argv(job(tmp_path, "sdxl", te_lr=0.0), batch=4, output_dir="/o", output_name="x")
    assert xl[2] == str(DOUBLE / "sdxl_train_network.py")
    assert {"--cache_text_encoder_outputs", "--network_train_unet_only", "--sdpa"} <= set(xl)
    cpu = hand_argv(job(tmp_path, cpu=True), batch=1, output_dir="/o", output_name="x")
    assert "--sdpa" not in cpu and cpu[cpu.index("--mixed_precision") + 1] == "no"


def test_hand_runs_train_what_the_daemon_job_trained() -> None:
    auto = {"preset": "balanced", "resolution": 512, "network_dim": 16, "network_alpha": 8.0, "unet_lr": 3e-4,
            "text_encoder_lr": 5e-5, "optimizer": "AdamW8bit", "repeats": 10, "batch_size": 16}
    hp = hand_params("sd1", auto, resolution=512, images=20, optimizer=None)
    assert (hp["network_dim"], hp["unet_lr"], hp["text_encoder_lr"], hp["optimizer"]) == (16, 3e-4, 5e-5, "AdamW8bit")
    # SDXL's hand runs cache the text encoders, so they train the U-Net only; without a job: the preset, AdamW.
    xl = hand_params("sdxl", None, resolution=1024, images=20, optimizer=None)
    assert (xl["resolution"], xl["text_encoder_lr"], xl["optimizer"], xl["repeats"]) == (1024, 0.0, "AdamW", 10)


def test_the_dataset_leaves_the_batch_to_the_command_line() -> None:
    doc = dataset_document(image_dir="/img", class_tokens="person", arch="sd1", resolution=512, repeats=10)
    assert "batch_size" not in doc["general"] and doc["general"]["resolution"] == 512
    assert doc["datasets"][0]["subsets"][0]["num_repeats"] == 10
    assert doc["general"]["shuffle_caption"] is True
    xl = dataset_document(image_dir="/img", class_tokens="person", arch="sdxl", resolution=1024, repeats=10)
    assert xl["general"]["shuffle_caption"] is False


def _prepared(tmp_path: Path) -> None:
    from daemon.pipeline import kohya

    img = tmp_path / "img"
    img.mkdir()
    for i in range(8):
        (img / f"{i:03d}.png").write_bytes(picture_bytes(i, size=(128, 96)))
        (img / f"{i:03d}.txt").write_text("zkchar person", encoding="utf-8")
    write_tokenizer(tmp_path / "tok" / "openai_clip-vit-large-patch14")
    kohya.write_dataset_config(tmp_path / "dataset.toml", dataset_document(
        image_dir=str(img), class_tokens="person", arch="sd1", resolution=256, repeats=2))


def test_a_hand_run_of_the_double_is_measured(tmp_path: Path) -> None:
    _prepared(tmp_path)
    p = run_hand(job(tmp_path, cpu=True), batch=2, work=tmp_path / "runs", log_path=tmp_path / "b2.log",
                 timeout_s=120, peak_mib=lambda a, b: None)
    assert p.outcome == OK, p.note
    assert p.steps_per_s is not None and p.steps_per_s > 0 and p.images_per_s == pytest.approx(2 * p.steps_per_s)
    assert p.first_step_s is not None and p.first_step_s < p.wall_s
    assert "steps:" in (tmp_path / "b2.log").read_text(encoding="utf-8")


def test_a_hand_run_out_of_memory_is_told_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _prepared(tmp_path)
    monkeypatch.setenv("KOHYA_DOUBLE_FAIL", "oom")
    p = run_hand(job(tmp_path, cpu=True), batch=8, work=tmp_path / "runs", log_path=tmp_path / "b8.log",
                 timeout_s=120, peak_mib=lambda a, b: None)
    assert p.outcome == OOM and "out of memory" in p.note.lower()


def test_a_hand_run_past_its_time_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _prepared(tmp_path)
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "5")
    p = run_hand(job(tmp_path, cpu=True), batch=1, work=tmp_path / "runs", log_path=tmp_path / "b1.log",
                 timeout_s=3, peak_mib=lambda a, b: None)
    assert p.outcome == "timeout" and p.wall_s is not None and p.wall_s < 10


def test_real_h100_output_gives_the_harness_rate() -> None:
    """Run E of the H100 logs (batch 8, bf16), replayed with its recorded arrival times: the daemon's parser
    must give the rate the harness's own parser measured (speed.json)."""
    run = LOGS_DIR / "gpu-h100" / "E"
    if not (run / "chunks.jsonl").is_file():
        pytest.skip(f"H100 logs not found at {run}")
    streams = {name: (run / f"{name}.log").read_bytes() for name in ("stdout", "stderr")}
    watch = OutputWatch()
    for line in (run / "chunks.jsonl").read_text(encoding="utf-8").splitlines():
        c = json.loads(line)
        watch.feed(streams[c["stream"]][c["offset"]:c["offset"] + c["len"]], c["t"])
    watch.finish()
    expected = json.loads((run / "speed.json").read_text(encoding="utf-8"))
    assert watch.samples[-1].step == expected["steps_total"] == 30
    assert steady_rate(watch.samples, warmup_steps(30)) == pytest.approx(expected["steady_it_s"], rel=0.01)
    assert watch.model_saved and not watch.out_of_memory


# --- the daemon job -----------------------------------------------------------------------------------


def test_the_daemon_job_is_measured_from_202_to_the_published_lora(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The real daemon (`python -m daemon`) training with the kohya double: every number the table needs."""
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.3")
    write_tokenizer(tmp_path / "tok" / "openai_clip-vit-large-patch14")
    params = {"resolution": 256, "epochs": 1, "repeats": 3, "batch_size": 2, "network_dim": 4, "network_alpha": 2,
              "save_every_n_epochs": 0, "sample_every_n_epochs": 0}
    job = AutoJob(sd_scripts=str(DOUBLE), python=sys.executable,
                  model=str(write_sd1_checkpoint(tmp_path / "model.safetensors")),
                  tokenizer_cache=str(tmp_path / "tok"),
                  pictures=[picture_bytes(i, size=(320, 320), fmt="JPEG") for i in range(8)], params=params, cpu=True,
                  work=tmp_path / "work", log_dir=tmp_path / "logs", timeout_s=120)
    report = asyncio.run(run_auto(job, lambda a, b: None))
    assert report["state"] == "done", report
    assert report["batch_size"] == 2 and report["total_steps"] == 12
    # 12 steps 0.3 s apart: the steady rate is the double's, not the start-up's.
    assert report["steady_steps_per_s"] == pytest.approx(1 / 0.3, rel=0.3)
    assert report["steady_images_per_s"] == pytest.approx(2 * report["steady_steps_per_s"])
    assert 0 < report["first_step_s"] < report["click_to_lora_s"] <= report["result_s"] + 0.1
    assert report["lora"]["tensors"] > 0 and Path(report["artifact"]).parent == tmp_path / "work" / "lora"
    # A daemon from before the memory tiers refuses the key and the job is sent without it; one with them keeps it.
    assert ("memory_tier_refused" in report) != (report["memory_tier"] is not None)
    assert (tmp_path / "logs" / "trainer.log").is_file() and (tmp_path / "logs" / "daemon.log").is_file()


def test_a_whole_smoke_run_against_the_double(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The command line end to end (daemon job, prep, sweep, verdicts, JSON, table), the double as kohya."""
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.1")
    write_tokenizer(tmp_path / "tok" / "openai_clip-vit-large-patch14")
    out = tmp_path / "out" / "r.json"
    assert main(["--cpu-smoke", "--kohya-sd", str(DOUBLE), "--kohya-python", sys.executable,
                 "--sd15-model", str(write_sd1_checkpoint(tmp_path / "m.safetensors")),
                 "--tokenizer-cache", str(tmp_path / "tok"), "--out", str(out), "--steps", "4"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    sd15 = report["models"]["sd15"]
    assert report["mode"] == "cpu-smoke" and "sdxl" not in report["models"]
    assert sd15["auto"]["state"] == "done" and sd15["auto"]["click_to_lora_s"] > 0
    assert [(r["batch"], r["outcome"]) for r in sd15["hand"]["runs"]] == [(1, OK), (2, OK)]
    assert sd15["hand"]["job"]["resolution"] == 256 and sd15["hand"]["best"]["images_per_s"] > 0
    assert sd15["verdicts"]["ratio_verdict"] == "not judged"
    assert sorted(p.name for p in (out.parent / "r-logs" / "sd15").iterdir()) == ["daemon", "hand-b1.log",
                                                                                  "hand-b2.log"]
    printed = capsys.readouterr().out
    assert "CPU SMOKE" in printed and "| sd15 | kohya by hand" in printed


# --- prerequisites ------------------------------------------------------------------------------------


def test_missing_inputs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--kohya-sd", str(tmp_path), "--sd15-model", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "train_network.py does not exist" in err
    assert "no kohya python" in err and "no SD1.5 model" in err and "no tokenizer cache" in err


def test_bad_params_and_batches_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--params", "{oops", "--sd15-batches", "4,2"]) == 2
    err = capsys.readouterr().err
    assert "--params is not JSON" in err and "ascending" in err
    assert main(["--params", "[1]"]) == 2
    assert "--params must be a JSON object" in capsys.readouterr().err


def test_prerequisites_pass_with_everything_there(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "tok" / "openai_clip-vit-large-patch14")
    sd = tmp_path / "sd-scripts"
    sd.mkdir()
    for script in ("train_network.py", "sdxl_train_network.py"):
        (sd / script).write_text("", encoding="utf-8")
    args = parse_args(["--cpu-smoke", "--kohya-sd", str(sd), "--kohya-python", sys.executable,
                       "--sd15-model", str(write_sd1_checkpoint(tmp_path / "m.safetensors")),
                       "--tokenizer-cache", str(tmp_path / "tok"), "--sdxl-model", "/ignored/in/smoke"])
    assert check_prerequisites(args) == []
    assert args.sdxl_model is None and args.images == 8 and args.steps == 2 and args.sd15_batches == "1,2"
    args.only, args.sdxl_model = "sdxl", str(tmp_path / "m.safetensors")
    assert check_prerequisites(args) == [
        "the CPU smoke mode trains SD1.5 only (SDXL on a CPU needs about 20 GB of RAM and hours)"]
    args.cpu_smoke = False
    assert check_prerequisites(args) == [
        "the tokenizer cache has no laion_CLIP-ViT-bigG-14-laion2B-39B-b160k/ (kohya would try to download it)"]
