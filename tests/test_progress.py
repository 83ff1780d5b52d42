"""daemon.pipeline.progress: line parsing, splitting and tracking, checked against real kohya output.

The fixture runs live in shared/kohya-logs/<group>/<run>/ (real bytes from real sd-scripts runs);
point KOHYA_LOGS_DIR elsewhere to use another copy.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from daemon.pipeline.failure import CANCELLED, FAILURE_KINDS, KILLED, classify_failure
from daemon.pipeline.progress import (
    _ERROR_RULES,
    ERR_BAD_ARGUMENTS,
    ERR_BAD_DATASET,
    ERR_BAD_DATASET_CONFIG,
    ERR_DISK_FULL,
    ERR_EXCEPTION,
    ERR_LAUNCHER,
    ERR_MISSING_DEPENDENCY,
    ERR_MODEL_MISMATCH,
    ERR_MODEL_NOT_FOUND,
    ERR_NAN_LOSS,
    ERR_NETWORK,
    ERR_NO_DATA,
    ERR_OUT_OF_MEMORY,
    ERR_SCRIPT_NOT_FOUND,
    ERR_SETTINGS_CONFLICT,
    ERR_TOKENIZER,
    ERR_TRACEBACK,
    PHASE_CACHING_LATENTS,
    PHASE_CACHING_TEXT,
    PHASE_CREATING_LORA,
    PHASE_LOADING_MODEL,
    PHASE_PREVIEW,
    PHASE_TRAINING,
    PREP_PHASES,
    CheckpointSaved,
    EpochStarted,
    ErrorLine,
    LineSplitter,
    ModelSaved,
    OutputParser,
    PrepProgress,
    PrepStarted,
    ProgressEvent,
    ProgressTracker,
    SampleImagesStarted,
    StepProgress,
    TotalSteps,
    _classify_error,
    _clean,
    _split_parts,
    parse_line,
    prep_phase,
    split_glued_line,
)
from daemon.pipeline.runner import preview_phase
from tests.conftest import train_form

REPO = Path(__file__).resolve().parents[1]
LOGS_DIR = Path(os.environ.get("KOHYA_LOGS_DIR", REPO.parent / "shared" / "kohya-logs"))
CHUNK_BYTES = 37  # odd on purpose: cuts multi-byte characters, bars and CRLFs at varied places
TAIL_LINES = 40

# --- parse_line ------------------------------------------------------------------------------------

BAR = "█████     "


def steps(
    step: int,
    total: int,
    rate: float | None,
    elapsed: float | None,
    eta: float | None,
    loss: float | None = None,
) -> StepProgress:
    return StepProgress(step=step, total=total, rate=rate, elapsed_s=elapsed, eta_s=eta, loss=loss)


PARSE_CASES: list[tuple[str, str, ProgressEvent | None]] = [
    # training bar: rates, times, losses
    (
        "it/s",
        f"steps:  50%|{BAR}| 8/16 [00:07<00:07,  1.05it/s, avr_loss=1.18]",
        steps(8, 16, 1.05, 7, 7, 1.18),
    ),
    (
        "s/it inverted",
        "steps:  12%|█▎        | 1/8 [00:03<00:21,  4.00s/it, avr_loss=1.21]",
        steps(1, 8, 0.25, 3, 21, 1.21),
    ),
    ("unknown rate and eta", "steps:   0%|          | 0/32 [00:00<?, ?it/s]", steps(0, 32, None, 0, None)),
    ("no loss yet", "steps:   3%|▎         | 1/32 [00:00<00:28,  1.09it/s]", steps(1, 32, 1.09, 0, 28)),
    (
        "H:MM:SS",
        "steps:  10%|█         | 160/1600 [1:02:03<10:18:27,  2.33s/it, avr_loss=0.0912]",
        steps(160, 1600, 1 / 2.33, 3723, 10 * 3600 + 18 * 60 + 27, 0.0912),
    ),
    (
        "scientific loss",
        f"steps:  50%|{BAR}| 8/16 [00:07<00:07,  1.05it/s, avr_loss=1.23e-5]",
        steps(8, 16, 1.05, 7, 7, 1.23e-5),
    ),
    (
        "trailing padding",
        "steps:  67%|██████▋   | 40/60 [00:24<00:12,  1.66it/s, avr_loss=1]   ",
        steps(40, 60, 1.66, 24, 12, 1.0),
    ),
    (
        "extra postfix keys",
        f"steps:  50%|{BAR}| 8/16 [00:07<00:07,  1.05it/s, "
        "avr_loss=0.5, Keys Scaled=3, Average key norm=0.52]",
        steps(8, 16, 1.05, 7, 7, 0.5),
    ),
    (
        "glued rich record after bar",
        "steps: 100%|██████████| 8/8 [00:22<00:00,  2.85s/it, avr_loss=1.16]"
        "2026-11-26 15:15:09 INFO     model saved.                  train_network.py:1729",
        steps(8, 8, 1 / 2.85, 22, 0, 1.16),
    ),
    # other bars are not training progress
    ("image sizes bar", "100%|██████████| 8/8 [00:00<00:00, 157532.54it/s]", None),
    ("read caption bar", "read caption: 100%|██████████| 8/8 [00:00<00:00, 23763.76it/s]", None),
    ("latents bar", " 38%|███▊      | 3/8 [00:03<00:06,  1.37s/it]", None),
    ("sample bar with cursor-up", " 25%|██▌       | 1/4 [00:00<00:02,  1.01it/s]\x1b[A", None),
    ("pipeline bar", "Loading pipeline components...:  25%|██▌       | 1/4 [00:00<00:00,  4.68it/s]", None),
    ("validation bar", f"validation steps:  50%|{BAR}| 2/4 [00:01<00:01,  1.50it/s]", None),
    ("epoch validation bar", f"epoch validation steps:  50%|{BAR}| 2/4 [00:01<00:01,  1.50it/s]", None),
    ("no-total bar", "0it [00:00, ?it/s]", None),
    # stdout prints
    ("total steps", "  total optimization steps / 学習ステップ数: 32", TotalSteps(32)),
    ("total steps, mojibake", "  total optimization steps / \ufffd\ufffd: 1000", TotalSteps(1000)),
    (
        "override steps is not the total",
        "override steps. steps for 2 epochs is / 指定エポックまでのステップ数: 32",
        None,
    ),
    ("epoch", "epoch 1/2", EpochStarted(1, 2)),
    ("epochs summary is not an epoch", "  num epochs / epoch数: 2", None),
    (
        "checkpoint",
        "saving checkpoint: /runs/01/lora_folder-000001.safetensors",
        CheckpointSaved("/runs/01/lora_folder-000001.safetensors"),
    ),
    (
        "checkpoint with spaces",
        "saving checkpoint: /my loras/a b.safetensors",
        CheckpointSaved("/my loras/a b.safetensors"),
    ),
    # model saved in every format seen
    ("model saved, simple", "model saved.", ModelSaved()),
    (
        "model saved, rich",
        "2026-11-26 15:14:23 INFO     model saved.                  train_network.py:1729",
        ModelSaved(),
    ),
    (
        "model saved, rich blank time",
        "                    INFO     model saved.                  train_network.py:1729",
        ModelSaved(),
    ),
    (
        "model saved, rich 200 cols",
        "2026-11-26 15:16:20 INFO     model saved." + " " * 120 + "train_network.py:1729",
        ModelSaved(),
    ),
    # samples
    (
        "samples, simple",
        "generating sample images at step / サンプル画像生成 ステップ: 16",
        SampleImagesStarted(16),
    ),
    (
        "samples, rich head wrapped",
        "                    INFO     generating sample images at step train_util.py:6394",
        SampleImagesStarted(None),
    ),
    # the phases before the first step (shared/kohya-logs/cpu-sdxl/01 with --console_log_simple; cpu/01 Rich)
    ("loading model", "loading model for process 0/1", PrepStarted(PHASE_LOADING_MODEL)),
    (
        "loading model, rich",
        "                    INFO     loading model for process 0/1    train_util.py:5574",
        PrepStarted(PHASE_LOADING_MODEL),
    ),
    (
        "load checkpoint",
        "load StableDiffusion checkpoint: /home/user/lab/.harness/models/sdxl-random.safetensors",
        PrepStarted(PHASE_LOADING_MODEL),
    ),
    ("caching latents strategy", "caching latents with caching strategy.", PrepStarted(PHASE_CACHING_LATENTS)),
    (
        "caching latents, rich wrapped",
        "                    INFO     caching latents with caching     train_util.py:1120",
        PrepStarted(PHASE_CACHING_LATENTS),
    ),
    ("caching latents loop", "caching latents...", PrepStarted(PHASE_CACHING_LATENTS)),
    (
        "caching text encoder outputs",
        "caching Text Encoder outputs with caching strategy.",
        PrepStarted(PHASE_CACHING_TEXT),
    ),
    ("caching text encoder loop", "caching Text Encoder outputs...", PrepStarted(PHASE_CACHING_TEXT)),
    ("import network", "import network module: networks.lora", PrepStarted(PHASE_CREATING_LORA)),
    (
        "create lora, rich",
        "2026-11-26 15:13:30 INFO     create LoRA network. base dim (rank):   lora.py:935",
        PrepStarted(PHASE_CREATING_LORA),
    ),
    ("create lora for te is the same phase", "create LoRA for Text Encoder 1:", None),
    ("cache check", "checking cache validity...", None),
    # bench/chatty_trainer.py floods these: they must stay on the fast path and announce nothing
    ("other caching line", "caching latents: bucket 3 image 7 of the flood, size (512, 512) -> (64, 64)", None),
    ("move models", "move vae and unet to cpu to save memory", None),
    ("unet dtype", "unet dtype: torch.float32, device: cpu", None),
    # noise that must stay quiet
    (
        "torch checkpoint warning while sampling",
        "/home/user/lab/.harness/venv/lib/python3.11/site-packages/torch/utils/checkpoint.py:238: UserWarning: "
        "None of the inputs have requires_grad=True. Gradients will be None",
        None,
    ),
    ("torch warning source line", "  check_backward_validity(args)", None),
    ("epoch incremented", "epoch is incremented. current_epoch: 0, epoch: 1", None),
    (
        "epoch incremented, rich",
        "2026-11-26 15:14:01 INFO     epoch is incremented.             train_util.py:784",
        None,
    ),
    (
        "bitsandbytes kernels warning",
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. "
        "Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
        None,
    ),
    (
        "git warning",
        "fatal: ambiguous argument 'HEAD': unknown revision or path not in the working tree.",
        None,
    ),
    (
        "mean ar error",
        "                    INFO     mean ar error (without repeats): train_util.py:1074",
        None,
    ),
    ("usage line", "                        [--console_log_level {DEBUG,INFO,WARNING,ERROR,CRITICAL}]", None),
    ("raise in traceback", "    raise ConnectionError(e, request=request)", None),
    ("blank", "   ", None),
    # failures
    (
        "cuda oom",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. "
        "GPU 0 has a total capacity of 7.79 GiB",
        ErrorLine(ERR_OUT_OF_MEMORY, ""),
    ),
    (
        "no data, rich",
        "                    ERROR    No data found. Please verify   train_network.py:576",
        ErrorLine(ERR_NO_DATA, ""),
    ),
    ("traceback", "Traceback (most recent call last):", ErrorLine(ERR_TRACEBACK, "")),
    (
        "argparse unknown",
        "train_network.py: error: unrecognized arguments: --network_dimm 8",
        ErrorLine(ERR_BAD_ARGUMENTS, ""),
    ),
    (
        "argparse choice",
        "train_network.py: error: argument --save_model_as: invalid choice: 'bin' "
        "(choose from 'ckpt', 'safetensors')",
        ErrorLine(ERR_BAD_ARGUMENTS, ""),
    ),
    (
        "script missing",
        "/venv/bin/python3: can't open file '/sd-scripts/train_network_typo.py': "
        "[Errno 2] No such file or directory",
        ErrorLine(ERR_SCRIPT_NOT_FOUND, ""),
    ),
    (
        "invalid config",
        "2026-11-26 15:14:23 ERROR    Invalid user config / ユーザ設定の形式が正しくないよう"
        "です   config_util.py:389",
        ErrorLine(ERR_BAD_DATASET_CONFIG, ""),
    ),
    (
        "voluptuous",
        "voluptuous.error.MultipleInvalid: extra keys not allowed "
        "@ data['datasets'][0]['subsets'][0]['name']",
        ErrorLine(ERR_BAD_DATASET_CONFIG, ""),
    ),
    (
        "empty caption",
        "AssertionError: caption file is empty / キャプションファイルが空です: /img/a.txt",
        ErrorLine(ERR_BAD_DATASET, ""),
    ),
    (
        "no bitsandbytes",
        "ImportError: No bitsandbytes / bitsandbytesがインストールされていないようです",
        ErrorLine(ERR_MISSING_DEPENDENCY, ""),
    ),
    (
        "no xformers",
        "ImportError: No xformers / xformersがインストールされていないようです",
        ErrorLine(ERR_MISSING_DEPENDENCY, ""),
    ),
    (
        "module missing",
        "ModuleNotFoundError: No module named 'lion_pytorch'",
        ErrorLine(ERR_MISSING_DEPENDENCY, ""),
    ),
    (
        "model missing",
        'ValueError: The provided pretrained_model_name_or_path "/m/x.safetensors" '
        "is neither a valid local path nor a valid repo id. Please check the parameter.",
        ErrorLine(ERR_MODEL_NOT_FOUND, ""),
    ),
    (
        "hf validation",
        "huggingface_hub.errors.HFValidationError: "
        "Repo id must be in the form 'repo_name' or 'namespace/repo_name'",
        ErrorLine(ERR_MODEL_NOT_FOUND, ""),
    ),
    (
        "state dict",
        "RuntimeError: Error(s) in loading state_dict for UNet2DConditionModel:",
        ErrorLine(ERR_MODEL_MISMATCH, ""),
    ),
    (
        "tokenizer frame",
        '  File "/sd-scripts/library/strategy_base.py", line 65, in _load_tokenizer',
        ErrorLine(ERR_TOKENIZER, ""),
    ),
    (
        "tokenizer oserror",
        "OSError: Can't load tokenizer for 'openai/clip-vit-large-patch14'. "
        "If you were trying to load it from ...",
        ErrorLine(ERR_TOKENIZER, ""),
    ),
    (
        "connection error",
        "requests.exceptions.ConnectionError: "
        "(MaxRetryError(\"HTTPSConnectionPool(host='huggingface.co', port=443)",
        ErrorLine(ERR_NETWORK, ""),
    ),
    ("disk full", "OSError: [Errno 28] No space left on device", ErrorLine(ERR_DISK_FULL, "")),
    (
        "te caching with te training",
        "AssertionError: network for Text Encoder cannot be trained with caching Text Encoder outputs / Text "
        "Encoderの出力をキャッシュしながらText Encoderのネットワークを学習することはできません",
        ErrorLine(ERR_SETTINGS_CONFLICT, ""),
    ),
    (
        "fp8 without mixed precision",
        "AssertionError: fp8_base requires mixed precision='fp16' or 'bf16' / fp8を使う場合はmixed_precision="
        "'fp16'または'bf16'が必要です。",
        ErrorLine(ERR_SETTINGS_CONFLICT, ""),
    ),
    (
        "sdxl bucket steps",
        "AssertionError: bucket_reso_steps is 48. it must be divisible by 32.",
        ErrorLine(ERR_SETTINGS_CONFLICT, ""),
    ),
    ("other assertion is no settings conflict", "AssertionError: unexpected shape", None),
    (
        "accelerate wrapper echoes argv",
        "subprocess.CalledProcessError: Command '['python3', 'train_network.py', "
        "'--output_name', 'No data found']' returned non-zero exit status 1.",
        ErrorLine(ERR_LAUNCHER, ""),
    ),
]


@pytest.mark.parametrize(
    ("line", "expected"), [(c[1], c[2]) for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES]
)
def test_parse_line(line: str, expected: ProgressEvent | None) -> None:
    got = parse_line(line)
    if isinstance(expected, ErrorLine):
        # The message is the line minus decoration; only the kind is pinned here.
        assert isinstance(got, ErrorLine)
        assert got.kind == expected.kind
        assert got.message and got.message in line
    elif isinstance(expected, StepProgress):
        assert isinstance(got, StepProgress)
        assert (got.step, got.total, got.elapsed_s, got.eta_s) == (
            expected.step,
            expected.total,
            expected.elapsed_s,
            expected.eta_s,
        )
        assert got.rate == pytest.approx(expected.rate)
        assert got.loss == pytest.approx(expected.loss)
    else:
        assert got == expected


def test_parse_line_nan_loss() -> None:
    got = parse_line(f"steps:  50%|{BAR}| 8/16 [00:07<00:07,  1.05it/s, avr_loss=nan]")
    assert isinstance(got, StepProgress)
    assert got.loss is not None and math.isnan(got.loss)


def test_parse_line_rich_message_drops_decoration() -> None:
    got = parse_line("2026-11-26 15:16:53 ERROR    No data found. Please verify   train_network.py:576")
    assert got == ErrorLine(ERR_NO_DATA, "No data found. Please verify")


# --- split_glued_line ---------------------------------------------------------------------------------

GLUE_CASES = [
    ("plain line", "epoch 1/2", ["epoch 1/2"]),
    (
        "bar alone",
        "steps:   0%|          | 0/6 [00:00<?, ?it/s]",
        ["steps:   0%|          | 0/6 [00:00<?, ?it/s]"],
    ),
    (
        "bar with padding",
        "steps: 100%|██████████| 6/6 [00:15<00:00,  2.54s/it]   ",
        ["steps: 100%|██████████| 6/6 [00:15<00:00,  2.54s/it]   "],
    ),
    (
        "bar then traceback",
        "steps:   2%|▏         | 3/160 [00:02<02:17,  1.14it/s, avr_loss=1.23]"
        "Traceback (most recent call last):",
        [
            "steps:   2%|▏         | 3/160 [00:02<02:17,  1.14it/s, avr_loss=1.23]",
            "Traceback (most recent call last):",
        ],
    ),
    (
        "bar then blank-time record",
        "steps:   0%|          | 0/32 [00:00<?, ?it/s]"
        "                    INFO     epoch is incremented.   train_util.py:784",
        [
            "steps:   0%|          | 0/32 [00:00<?, ?it/s]",
            "                    INFO     epoch is incremented.   train_util.py:784",
        ],
    ),
    (
        "sample bar escape",
        " 25%|██▌       | 1/4 [00:00<00:02,  1.01it/s]\x1b[A",
        [" 25%|██▌       | 1/4 [00:00<00:02,  1.01it/s]"],
    ),
]


@pytest.mark.parametrize(
    ("line", "expected"), [(c[1], c[2]) for c in GLUE_CASES], ids=[c[0] for c in GLUE_CASES]
)
def test_split_glued_line(line: str, expected: list[str]) -> None:
    assert split_glued_line(line) == expected


# --- LineSplitter -------------------------------------------------------------------------------------

SPLIT_CASES = [
    ("all three breaks", ["a\rb\nc\r\nd"], ["a", "b", "c"], ["d"]),
    ("crlf across chunks", ["a\r", "\nb\n"], ["a", "b"], []),
    ("partial tail kept", ["ste", "ps: 1", "\rnext"], ["steps: 1"], ["next"]),
    ("blank lines dropped", ["\n\n   \nx\n", "\r\r"], ["x"], []),
    ("nothing", [""], [], []),
]


@pytest.mark.parametrize(
    ("chunks", "lines", "tail"), [(c[1], c[2], c[3]) for c in SPLIT_CASES], ids=[c[0] for c in SPLIT_CASES]
)
def test_line_splitter(chunks: list[str], lines: list[str], tail: list[str]) -> None:
    splitter = LineSplitter()
    got = [line for chunk in chunks for line in splitter.feed(chunk)]
    assert got == lines
    assert splitter.flush() == tail
    assert splitter.flush() == []


def test_line_splitter_pending_exposes_live_bar() -> None:
    splitter = LineSplitter()
    assert splitter.feed("\rsteps:  25%|██▌       | 1/4 [00:00<00:02,  1.05it/s]") == []
    assert parse_line(splitter.pending) == StepProgress(1, 4, 1.05, 0.0, 2.0, None)


def test_line_splitter_bounds_a_line_without_breaks() -> None:
    splitter = LineSplitter()
    lines = splitter.feed("x" * (LineSplitter.MAX_LINE_CHARS + 1))
    assert len(lines) == 1
    assert splitter.pending == ""


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 64])
def test_line_splitter_is_chunking_invariant(size: int) -> None:
    text = "a\r\nbb\rccc\n\n\rsteps: 1/2 [\r\n" + "ü語" * 5 + "\rtail"
    splitter = LineSplitter()
    got = [line for start in range(0, len(text), size) for line in splitter.feed(text[start : start + size])]
    assert got + splitter.flush() == ["a", "bb", "ccc", "steps: 1/2 [", "ü語" * 5, "tail"]


# --- ProgressTracker -----------------------------------------------------------------------------------

SAMPLE_HEAD = "2026-11-26 15:13:54 INFO     generating sample images at step train_util.py:6394"
SAMPLE_CONT = "                             / サンプル画像生成 ステップ: 16                    "


def feed_all(tracker: ProgressTracker, lines: list[str]) -> list[ProgressEvent]:
    return [event for line in lines for event in tracker.feed_line(line)]


def test_tracker_joins_wrapped_sample_step_without_waiting() -> None:
    tracker = ProgressTracker()
    assert tracker.feed_line(SAMPLE_HEAD) == []
    assert tracker.feed_line(SAMPLE_CONT) == [SampleImagesStarted(16)]
    assert tracker.finish() == []


def test_tracker_flushes_unfinished_sample_record_before_next_line() -> None:
    tracker = ProgressTracker()
    events = feed_all(
        tracker, [SAMPLE_HEAD, "                    INFO     prompt: sks red circle   train_util.py:6542"]
    )
    assert events == [SampleImagesStarted(None)]


def test_tracker_joins_wrapped_rich_checkpoint_path() -> None:
    # Not seen in the fixtures (kohya prints this one to stdout) but rich wraps any long logged path.
    tracker = ProgressTracker()
    lines = [
        "2026-11-26 15:14:23 INFO     saving checkpoint:              train_network.py:1300",
        "                             /home/user/lab/.harness/runs/_o                    ",
        "                             utputs/01/lora.safetensors                         ",
    ]
    assert feed_all(tracker, lines) == []
    assert tracker.finish() == [CheckpointSaved("/home/user/lab/.harness/runs/_outputs/01/lora.safetensors")]
    assert tracker.checkpoints == ("/home/user/lab/.harness/runs/_outputs/01/lora.safetensors",)


def test_tracker_splits_bar_from_glued_model_saved() -> None:
    tracker = ProgressTracker()
    events = tracker.feed_line(
        "steps: 100%|██████████| 8/8 [00:22<00:00,  2.85s/it, avr_loss=1.16]"
        "2026-11-26 15:15:09 INFO     model saved.                  train_network.py:1729"
    )
    assert [type(event) for event in events] == [StepProgress, ModelSaved]
    assert tracker.model_saved


def test_tracker_records_exception_after_glued_traceback() -> None:
    tracker = ProgressTracker()
    feed_all(
        tracker,
        [
            "steps:   2%|▏         | 3/160 [00:02<02:17,  1.14it/s, avr_loss=1.23]"
            "Traceback (most recent call last):",
            '  File "/sd-scripts/train_network.py", line 1445, in train',
            "    accelerator.backward(loss)",
            "           ^^^^^^^^^^^^^^^^^^^^^",
            "KeyboardInterrupt",
            "steps:   2%|▏         | 3/160 [00:03<03:10,  1.21s/it, avr_loss=1.23]",
        ],
    )
    assert [(e.kind, e.message) for e in tracker.errors] == [
        (ERR_TRACEBACK, "Traceback (most recent call last):"),
        (ERR_EXCEPTION, "KeyboardInterrupt"),
    ]
    assert tracker.step == 3


def test_tracker_drops_exact_redraws_only() -> None:
    tracker = ProgressTracker()
    first = "steps:   3%|▎         | 1/32 [00:00<00:28,  1.09it/s]"
    with_loss = "steps:   3%|▎         | 1/32 [00:00<00:28,  1.09it/s, avr_loss=1.24]"
    assert len(feed_all(tracker, [first, first, with_loss, with_loss])) == 2


def test_tracker_reports_nan_once() -> None:
    tracker = ProgressTracker()
    events = feed_all(
        tracker,
        [
            f"steps:  50%|{BAR}| 8/16 [00:07<00:07,  1.05it/s, avr_loss=nan]",
            f"steps:  56%|{BAR}| 9/16 [00:08<00:06,  1.05it/s, avr_loss=nan]",
        ],
    )
    nan_errors = [e for e in events if isinstance(e, ErrorLine)]
    assert nan_errors == [ErrorLine(ERR_NAN_LOSS, "avr_loss=nan at step 8")]
    assert tracker.errors == tuple(nan_errors)


def test_tracker_state_follows_summary_then_bar() -> None:
    tracker = ProgressTracker()
    feed_all(tracker, ["  total optimization steps / 学習ステップ数: 1000", "epoch 3/10"])
    assert (tracker.total_steps, tracker.epoch, tracker.epochs, tracker.step) == (1000, 3, 10, 0)
    # On resume with --skip_until_initial_step the bar counts only the remaining steps.
    tracker.feed_line("steps:   0%|          | 5/800 [00:03<?, ?it/s]")
    assert (tracker.total_steps, tracker.step) == (800, 5)


def test_tracker_caps_and_dedupes_errors() -> None:
    tracker = ProgressTracker(max_errors=2)
    feed_all(tracker, ["Traceback (most recent call last):"] * 3 + ["x: error: one", "y: error: two"])
    assert [e.kind for e in tracker.errors] == [ERR_TRACEBACK, ERR_EXCEPTION]


# --- every real run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    total: int | None = None
    epochs: tuple[int, ...] = ()  # epoch numbers printed, in order
    declared_epochs: int | None = None
    final: str | None = None  # basename of the last `saving checkpoint:`
    model_saved: bool = False
    kind: str | None = None  # classify_failure with the run's own cancel flag
    kind_without_cancel: str | None = None  # the same run had the daemon not asked for it
    samples: tuple[int | None, ...] = ()


def ok(total: int, epochs: int, final: str, samples: tuple[int | None, ...] = ()) -> Expected:
    return Expected(total, tuple(range(1, epochs + 1)), epochs, final, True, None, None, samples)


def failed(kind: str) -> Expected:
    return Expected(kind=kind, kind_without_cancel=kind)


EXPECTED: dict[str, Expected] = {
    "cpu/01_ok_folder_python_2ep_samples": ok(32, 2, "lora_folder.safetensors", samples=(0, 16, 32)),
    "cpu/02_ok_toml_accelerate_128px": ok(8, 1, "lora_toml.safetensors"),
    "cpu/03_ok_config_file": ok(6, 1, "lora_config_file.safetensors"),
    "cpu/04_ok_console_log_simple": ok(4, 1, "lora_simple.safetensors"),
    "cpu/05_ok_rich_columns200": ok(4, 1, "lora_wide.safetensors"),
    "cpu/06_ok_diffusers_folder_model": ok(4, 1, "lora_diffusers_base.safetensors"),
    "cpu/10_fail_missing_model": failed("model_not_found"),
    "cpu/11_fail_empty_dataset": failed("no_data"),
    "cpu/12_fail_unknown_argument": failed("bad_arguments"),
    "cpu/13_fail_no_tokenizer_cache_offline": failed("tokenizer_missing"),
    # python's "can't open file" under accelerate: the launch command named a missing script.
    "cpu/14_fail_accelerate_missing_script": failed("bad_arguments"),
    "cpu/15_fail_no_tokenizer_cache_no_network": failed("tokenizer_missing"),
    "cpu/20_cancel_sigterm_group": Expected(160, (1,), 10, None, False, CANCELLED, KILLED),
    "cpu/21_cancel_sigint_group": Expected(160, (1,), 10, None, False, CANCELLED, KILLED),
    # Only the accelerate parent got SIGTERM; the child trained on and saved. Still the user's cancel.
    "cpu/22_cancel_sigterm_accelerate_parent_only": Expected(
        32, (1, 2), 2, "lora_cancel.safetensors", True, CANCELLED, KILLED
    ),
    "cpu-sdxl/01_ok_unet_only_2ep": ok(16, 2, "sdxl_lora.safetensors"),
    "cpu-sdxl/02_ok_unet_only_2ep_samples": ok(16, 2, "sdxl_lora_samples.safetensors", samples=(16,)),
    "cpu-sdxl/03_ok_text_encoders_too_2steps": ok(2, 1, "sdxl_lora_te.safetensors"),
    "cpu-sdxl/04_ok_unet_only_2ep_full_bf16": ok(16, 2, "sdxl_lora_bf16.safetensors"),
    "cpu-sdxl/10_fail_sd15_checkpoint_to_sdxl_script": failed("model_incompatible"),
    "cpu-sdxl/11_fail_sdxl_checkpoint_to_sd15_script": failed("model_incompatible"),
    # kohya's own asserts on options that cannot go together: the daemon started it wrong
    "cpu-sdxl/12_fail_cache_te_outputs_with_te_training": failed("bad_arguments"),
    "cpu-sdxl/13_fail_no_bigg_tokenizer_offline": failed("tokenizer_missing"),
    "cpu-sdxl/14_fail_fp8_base_without_mixed_precision": failed("bad_arguments"),
    # The kernel's OOM killer after epoch 1 had been saved: exit 137, no traceback, nothing on stderr.
    "cpu-sdxl/30_oom_killed_unet_only_2ep": Expected(
        16, (1, 2), 2, "sdxl_lora-000001.safetensors", False, KILLED, KILLED
    ),
    "gpu-h100/A": ok(60, 1, "lora_A.safetensors"),
    "gpu-h100/B": ok(40, 3, "lora_B.safetensors"),
    "gpu-h100/C": ok(60, 1, "lora_C.safetensors"),
    "gpu-h100/D": ok(40, 1, "lora_D.safetensors"),
    "gpu-h100/E": ok(30, 4, "lora_E.safetensors"),
}


def run_dirs() -> list[Path]:
    return sorted(path.parent for path in LOGS_DIR.glob("*/*/exit_code"))


def run_params() -> list[object]:
    if not LOGS_DIR.is_dir():
        reason = f"kohya fixture logs not found at {LOGS_DIR} (set KOHYA_LOGS_DIR)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-fixtures")]
    return [pytest.param(path, id=f"{path.parent.name}/{path.name}") for path in run_dirs()]


def decoded_chunks(data: bytes, offsets: list[tuple[int, int]]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for offset, length in offsets:
        yield decoder.decode(data[offset : offset + length])
    yield decoder.decode(b"", final=True)


def fixed_chunks(size: int, total: int) -> list[tuple[int, int]]:
    return [(start, min(size, total - start)) for start in range(0, total, size)]


def replay_streams(run: Path) -> Iterator[tuple[str, str]]:
    """(stream, text) in arrival order: chunks.jsonl when recorded, else 37-byte chunks, stdout first."""
    data = {name: (run / f"{name}.log").read_bytes() for name in ("stdout", "stderr")}
    chunks_file = run / "chunks.jsonl"
    if chunks_file.is_file():
        records = [json.loads(line) for line in chunks_file.read_text().splitlines() if line.strip()]
        order = [(r["stream"], r["offset"], r["len"]) for r in records]
    else:
        order = [(name, o, n) for name in data for o, n in fixed_chunks(CHUNK_BYTES, len(data[name]))]
    decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in data}
    for stream, offset, length in order:
        yield stream, decoders[stream].decode(data[stream][offset : offset + length])
    for name, decoder in decoders.items():
        yield name, decoder.decode(b"", final=True)


@dataclass
class Replay:
    tracker: ProgressTracker
    events: list[ProgressEvent]
    lines: list[str]


def replay(run: Path, mode: str) -> Replay:
    """`streams`: one LineSplitter per pipe, as a daemon reading both pipes does.
    `combined`: one splitter over the interleaved bytes, as a daemon with stderr merged into stdout does."""
    tracker = ProgressTracker()
    events: list[ProgressEvent] = []
    lines: list[str] = []
    if mode == "streams":
        splitters = {"stdout": LineSplitter(), "stderr": LineSplitter()}
        pieces = [(splitters[stream], text) for stream, text in replay_streams(run)]
        pieces += [(splitter, None) for splitter in splitters.values()]
    else:
        data = (run / "combined.log").read_bytes()
        splitter = LineSplitter()
        pieces = [(splitter, text) for text in decoded_chunks(data, fixed_chunks(CHUNK_BYTES, len(data)))]
        pieces.append((splitter, None))
    for splitter, text in pieces:
        for line in splitter.feed(text) if text is not None else splitter.flush():
            lines.append(line)
            events.extend(tracker.feed_line(line))
    events.extend(tracker.finish())
    return Replay(tracker, events, lines)


def listed_loras(run: Path) -> set[str] | None:
    listing = run / "output_files.txt"
    if not listing.is_file():
        return None
    return set(re.findall(r"(\S+\.safetensors)$", listing.read_text(), flags=re.MULTILINE))


def run_facts(run: Path) -> tuple[int, bool]:
    result = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else {}
    return int((run / "exit_code").read_text().strip()), bool(result.get("cancelled"))


def test_expectations_cover_every_fixture_run() -> None:
    if not LOGS_DIR.is_dir():
        pytest.skip(f"kohya fixture logs not found at {LOGS_DIR} (set KOHYA_LOGS_DIR)")
    present = {f"{path.parent.name}/{path.name}" for path in run_dirs()}
    assert set(EXPECTED) <= present, "a run named in EXPECTED is missing from the fixtures"


@pytest.mark.parametrize("mode", ["streams", "combined"])
@pytest.mark.parametrize("run", run_params())
def test_real_run(run: Path, mode: str) -> None:
    exit_code, cancelled = run_facts(run)
    key = f"{run.parent.name}/{run.name}"
    result = replay(run, mode)
    tracker, events = result.tracker, result.events
    loras = listed_loras(run)
    final = Path(tracker.checkpoints[-1]).name if tracker.checkpoints else None
    output_exists = final is not None and (final in loras if loras is not None else exit_code == 0)
    failure = classify_failure(
        exit_code=exit_code,
        cancelled=cancelled,
        model_saved=tracker.model_saved,
        output_exists=output_exists,
        errors=tracker.errors,
        tail=result.lines[-TAIL_LINES:],
    )
    if loras is not None:
        assert {Path(path).name for path in tracker.checkpoints} == loras

    expected = EXPECTED.get(key)
    if expected is None:
        # A run added to the fixtures later: hold it to what its own files say.
        succeeded = exit_code == 0 and bool(loras)
        assert (failure is None) == succeeded, failure
        assert failure is None or failure.kind in FAILURE_KINDS
        return

    totals = [event.total for event in events if isinstance(event, TotalSteps)]
    assert totals == ([expected.total] if expected.total is not None else [])
    assert tracker.total_steps == expected.total
    epochs = [event for event in events if isinstance(event, EpochStarted)]
    assert tuple(event.epoch for event in epochs) == expected.epochs
    assert {event.epochs for event in epochs} <= {expected.declared_epochs}
    assert tuple(e.step for e in events if isinstance(e, SampleImagesStarted)) == expected.samples
    assert final == expected.final
    assert tracker.model_saved is expected.model_saved
    assert (failure.kind if failure else None) == expected.kind, failure

    if expected.kind is None:
        progress = [event for event in events if isinstance(event, StepProgress)]
        assert progress[-1].step == progress[-1].total == expected.total
        assert all(event.loss is None or event.loss > 0 for event in progress)
        assert [p.step for p in progress] == sorted(p.step for p in progress)
        assert tracker.errors == (), "a clean run must not raise false alarms"
        return

    assert failure is not None
    assert failure.message and failure.hint
    # The same answer from the tail alone, and without the cancel flag.
    tail_only = classify_failure(
        exit_code=exit_code,
        cancelled=False,
        model_saved=tracker.model_saved,
        output_exists=output_exists,
        errors=(),
        tail=result.lines[-TAIL_LINES:],
    )
    assert tail_only is not None
    assert tail_only.kind == expected.kind_without_cancel


# --- OutputParser: both pipes, one pass, the bar still being drawn ----------------------------------------

BAR_1 = "steps:  25%|██▌       | 1/4 [00:00<00:02,  1.08it/s]"
BAR_1_LOSS = "steps:  25%|██▌       | 1/4 [00:00<00:02,  1.08it/s, avr_loss=1.24]"


def step_events(events: list[ProgressEvent]) -> list[StepProgress]:
    return [e for e in events if isinstance(e, StepProgress)]


def test_output_parser_reports_the_bar_tqdm_is_still_drawing() -> None:
    parser = OutputParser()
    # tqdm writes `\r` + bar and nothing after it: the bar is the pipe's unterminated tail.
    assert step_events(parser.feed("stderr", "\r" + BAR_1).events) == [steps(1, 4, 1.08, 0, 2)]
    # The next redraw ends the first (a repeat, not reported again) and is reported itself at once.
    assert step_events(parser.feed("stderr", "\r" + BAR_1_LOSS).events) == [steps(1, 4, 1.08, 0, 2, 1.24)]
    assert parser.feed("stderr", "\n").events == []
    assert parser.finish().events == []


def test_output_parser_waits_for_a_whole_bar() -> None:
    parser = OutputParser()
    assert parser.feed("stderr", "\r" + BAR_1_LOSS[:-9]).events == []  # cut inside the postfix
    assert parser.feed("stderr", BAR_1_LOSS[-9:-1]).events == []  # `avr_loss=1.24` without its `]`
    assert step_events(parser.feed("stderr", "]").events) == [steps(1, 4, 1.08, 0, 2, 1.24)]


def test_output_parser_keeps_other_pipes_and_bars_apart() -> None:
    parser = OutputParser()
    assert parser.feed("stderr", "\r 38%|███▊      | 3/8 [00:03<00:06,  1.37s/it]").events == []  # not training
    parsed = parser.feed("stdout", "epoch 1/2\nsome log line\n")
    assert parsed.events == [EpochStarted(1, 2)] and parsed.log_lines == ["epoch 1/2", "some log line"]


def parser_replay(run: Path, mode: str) -> tuple[list[tuple[int, ProgressEvent]], list[str]]:
    """(chunk index, event) and log lines from OutputParser, fed like `replay` feeds its splitters."""
    parser = OutputParser()
    if mode == "streams":
        pieces = list(replay_streams(run))
    else:
        data = (run / "combined.log").read_bytes()
        pieces = [("all", text) for text in decoded_chunks(data, fixed_chunks(CHUNK_BYTES, len(data)))]
    events: list[tuple[int, ProgressEvent]] = []
    log: list[str] = []
    for index, (stream, text) in enumerate(pieces):
        parsed = parser.feed(stream, text)
        events.extend((index, event) for event in parsed.events)
        log.extend(parsed.log_lines)
    parsed = parser.finish()
    events.extend((len(pieces), event) for event in parsed.events)
    return events, [*log, *parsed.log_lines]


def line_replay_with_index(run: Path, mode: str) -> list[tuple[int, ProgressEvent]]:
    tracker = ProgressTracker()
    if mode == "streams":
        splitters: dict[str, LineSplitter] = {}
        pieces = [(splitters.setdefault(s, LineSplitter()), t) for s, t in replay_streams(run)]
    else:
        data = (run / "combined.log").read_bytes()
        one = LineSplitter()
        splitters = {"all": one}
        pieces = [(one, text) for text in decoded_chunks(data, fixed_chunks(CHUNK_BYTES, len(data)))]
    events = [(i, e) for i, (sp, text) in enumerate(pieces) for line in sp.feed(text) for e in tracker.feed_line(line)]
    tail = [e for sp in splitters.values() for line in sp.flush() for e in tracker.feed_line(line)]
    return events + [(len(pieces), e) for e in [*tail, *tracker.finish()]]


@pytest.mark.parametrize("mode", ["streams", "combined"])
@pytest.mark.parametrize("run", run_params())
def test_output_parser_matches_line_by_line_and_is_never_later(run: Path, mode: str) -> None:
    """Same events (each bar once) and log lines as feeding whole lines, but every bar as soon as it is drawn."""
    fast, log = parser_replay(run, mode)
    slow = line_replay_with_index(run, mode)
    bars = (StepProgress, PrepProgress)
    assert [e for _, e in fast if not isinstance(e, bars)] == [e for _, e in slow if not isinstance(e, bars)]
    for bar in bars:
        assert [e for _, e in fast if isinstance(e, bar)] == [e for _, e in slow if isinstance(e, bar)]
        fast_at = [i for i, e in fast if isinstance(e, bar)]
        slow_at = [i for i, e in slow if isinstance(e, bar)]
        assert all(f <= s for f, s in zip(fast_at, slow_at, strict=True))
        if mode == "streams" and slow_at:
            assert sum(f < s for f, s in zip(fast_at, slow_at, strict=True)) >= len(slow_at) // 2  # most earlier
    lines = replay(run, mode).lines
    assert log == [p.rstrip() for line in lines for p, bar in _split_parts(line)
                   if not bar and p.strip() and "%|" not in p]


def test_error_hints_cover_every_rule_on_real_output() -> None:
    """The literal pre-filter must never hide an error line: compare with every rule run on every line."""
    if not LOGS_DIR.is_dir():
        pytest.skip(f"kohya fixture logs not found at {LOGS_DIR}")
    samples = [line for run in run_dirs() for line in replay(run, "combined").lines]
    samples += [line for line, _, _ in PARSE_CASES]
    checked = 0
    for line in samples:
        message = _clean(line).strip()
        slow = next((ErrorLine(kind, message) for kind, pattern in _ERROR_RULES if pattern.search(message)), None)
        assert _classify_error(message) == slow, line
        checked += slow is not None
    assert checked > 20


# --- the preview phase and the rate the tab shows ------------------------------------------------------

SAMPLES_RUN = LOGS_DIR / "cpu" / "01_ok_folder_python_2ep_samples"


def phases(events: list[ProgressEvent]) -> list[tuple[str, int]]:
    """(phase, step) after each event, as the runner tracks it, collapsed to the changes."""
    phase, preview_step, step = "training", None, 0
    seen: list[tuple[str, int]] = []
    for event in events:
        phase = preview_phase(phase, event, preview_step)
        if isinstance(event, SampleImagesStarted):
            preview_step = event.step
        if isinstance(event, StepProgress):
            step = event.step
        if not seen or seen[-1][0] != phase:
            seen.append((phase, step))
    return seen


@pytest.mark.skipif(not SAMPLES_RUN.is_dir(), reason="real kohya logs not available")
@pytest.mark.parametrize("mode", ["streams", "combined"])
def test_real_previews_start_and_end_the_preview_phase(mode: str) -> None:
    # sample_at_first (step 0), after epoch 1 (step 16) and after the last step (32): each preview
    # starts with kohya's `generating sample images` record and ends with what kohya does next.
    got = phases(replay(SAMPLES_RUN, mode).events)
    assert got == [("training", 0), ("preview", 0), ("training", 0), ("preview", 16), ("training", 16),
                   ("preview", 32), ("training", 32)]


def test_preview_phase_is_not_ended_by_a_redraw_of_the_same_step() -> None:
    started = SampleImagesStarted(16)
    assert preview_phase("training", started, None) == "preview"
    assert preview_phase("preview", steps(16, 32, 1.1, 14, 15), 16) == "preview"
    assert preview_phase("preview", steps(17, 32, 1.1, 15, 14), 16) == "training"
    assert preview_phase("preview", EpochStarted(2, 2), 16) == "training"
    assert preview_phase("preview", CheckpointSaved("/x/a.safetensors"), 32) == "training"
    assert preview_phase("preview", ModelSaved(), 32) == "training"
    # nothing else a preview prints ends it: its prompt records and its own (no-desc) sampler bars
    for line in ("                    INFO     prompt: sks red circle           train_util.py:6542",
                 " 50%|█████     | 2/4 [00:01<00:01,  1.15it/s]\x1b[A"):
        assert parse_line(line) is None


@pytest.mark.skipif(not SAMPLES_RUN.is_dir(), reason="real kohya logs not available")
def test_real_rate_leaves_the_preview_time_out() -> None:
    # sd-scripts calls progress_bar.unpause() after its previews, so tqdm's elapsed time and rate
    # (smoothing=0: steps / elapsed) count training steps only: the 7 s of previews after step 16
    # (arrival 36.4 s -> 43.5 s in chunks.jsonl) add 1 s to the bar's clock, one step's worth.
    bars = {e.step: e for e in step_events(replay(SAMPLES_RUN, "streams").events)}
    assert bars[16].elapsed_s == 14 and bars[17].elapsed_s == 15
    assert bars[16].rate is not None and bars[17].rate is not None
    assert abs(bars[17].rate - bars[16].rate) < 0.02
    assert bars[17].eta_s is not None and bars[17].eta_s <= 15 / bars[17].rate


async def test_daemon_sends_the_preview_phase_while_kohya_draws_previews(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # the double draws kohya's sampler bar for 0.6 s per picture: long enough to be seen, as real previews are
    monkeypatch.setenv("KOHYA_DOUBLE_SAMPLE_SECONDS", "0.6")
    monkeypatch.setenv("KOHYA_DOUBLE_CACHE_SECONDS", "0.05")  # caching the latents takes a moment, as in kohya
    ws = await client.ws_connect("/ws")
    assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
    params = json.dumps({"epochs": 2, "sample_every_n_epochs": 1})
    job_id = (await (await client.post("/train", data=train_form(8, name="Phase", params=params))).json())["job_id"]
    progress: list[dict[str, object]] = []
    while True:
        frame = await ws.receive_json(timeout=60)
        if frame["type"] == "progress":
            progress.append(frame["data"])
        if frame["type"] == "result":
            break
    await ws.close()
    changes = [(p["phase"], p["step"]) for i, p in enumerate(progress)
               if i == 0 or p["phase"] != progress[i - 1]["phase"]]
    total = progress[-1]["total"]
    assert isinstance(total, int) and total > 0
    # kohya's start-up phases come first (the double prints them as the real one does), then training
    # (phases kohya passes within one chunk of output are sent as the last of them)
    prep = [phase for phase, _ in changes[:-5]]
    order = [PHASE_LOADING_MODEL, PHASE_CACHING_LATENTS, PHASE_CREATING_LORA]
    assert PHASE_CACHING_LATENTS in prep and prep == sorted(prep, key=order.index), prep
    # after epoch 1 (half way) and after the last step; each ends with what kohya does next
    assert changes[-5:] == [("training", changes[-5][1]), ("preview", total // 2), ("training", total // 2),
                            ("preview", total), ("training", total)]
    job = await (await client.get(f"/jobs/{job_id}/status")).json()
    assert job["state"] == "done" and job["progress"]["phase"] == "training"


# --- SDXL: the phases before the first step, the bars, the previews (shared/kohya-logs/cpu-sdxl) -----------

SDXL_LOGS = LOGS_DIR / "cpu-sdxl"
BEFORE_TRAINING = [PHASE_LOADING_MODEL, PHASE_CACHING_LATENTS, PHASE_CACHING_TEXT, PHASE_CREATING_LORA]
WITHOUT_TEXT_CACHE = [PHASE_LOADING_MODEL, PHASE_CACHING_LATENTS, PHASE_CREATING_LORA, PHASE_TRAINING]
PREVIEWS = [PHASE_PREVIEW, PHASE_TRAINING]

# The job's phase as the runner follows it (prep_phase, then preview_phase), collapsed to its changes.
JOB_PHASES: dict[str, list[str]] = {
    "cpu-sdxl/01_ok_unet_only_2ep": [*BEFORE_TRAINING, PHASE_TRAINING],
    "cpu-sdxl/02_ok_unet_only_2ep_samples": [*BEFORE_TRAINING, PHASE_TRAINING, *PREVIEWS],
    # the text encoders are trained, so their outputs are not cached
    "cpu-sdxl/03_ok_text_encoders_too_2steps": WITHOUT_TEXT_CACHE,
    "cpu-sdxl/04_ok_unet_only_2ep_full_bf16": [*BEFORE_TRAINING, PHASE_TRAINING],
    "cpu-sdxl/10_fail_sd15_checkpoint_to_sdxl_script": [PHASE_LOADING_MODEL],
    "cpu-sdxl/11_fail_sdxl_checkpoint_to_sd15_script": [PHASE_LOADING_MODEL],
    "cpu-sdxl/12_fail_cache_te_outputs_with_te_training": [],
    "cpu-sdxl/13_fail_no_bigg_tokenizer_offline": [],
    # fp8_base is refused only after the whole start-up
    "cpu-sdxl/14_fail_fp8_base_without_mixed_precision": BEFORE_TRAINING,
    "cpu-sdxl/30_oom_killed_unet_only_2ep": [*BEFORE_TRAINING, PHASE_TRAINING],
    # SD 1.x: the same phases from Rich records on stderr, and from plain stdout
    "cpu/01_ok_folder_python_2ep_samples": [*WITHOUT_TEXT_CACHE, *PREVIEWS * 3],
    "cpu/04_ok_console_log_simple": WITHOUT_TEXT_CACHE,
    "gpu-h100/A": WITHOUT_TEXT_CACHE,
}
IMAGES = {"cpu-sdxl": 8, "cpu": 8, "gpu-h100": 16}  # what each caching bar counts: the pictures, once each


def job_phases(events: list[ProgressEvent]) -> list[str]:
    phase, preview_step, step, seen = PHASE_TRAINING, None, 0, []
    for event in events:
        phase = preview_phase(prep_phase(phase, event), event, preview_step)
        if isinstance(event, SampleImagesStarted):
            preview_step = event.step if event.step is not None else step
        if isinstance(event, StepProgress):
            step = event.step
        if phase != (seen[-1] if seen else PHASE_TRAINING):
            seen.append(phase)
    return seen


def phase_runs() -> list[object]:
    return [pytest.param(LOGS_DIR / key, id=key) for key in JOB_PHASES]


@pytest.mark.skipif(not SDXL_LOGS.is_dir(), reason="real SDXL kohya logs not available")
@pytest.mark.parametrize("mode", ["streams", "combined"])
@pytest.mark.parametrize("run", phase_runs())
def test_real_phases_before_training(run: Path, mode: str) -> None:
    key = f"{run.parent.name}/{run.name}"
    events = replay(run, mode).events
    assert job_phases(events) == JOB_PHASES[key]
    # each caching phase counts the pictures with its own bar, up to the end, never backwards: the quick
    # `checking cache validity...` bar before the text-encoder loop (8/8 at once) is not one of them
    for phase in (PHASE_CACHING_LATENTS, PHASE_CACHING_TEXT):
        bars = [e for e in events if isinstance(e, PrepProgress) and e.phase == phase]
        if phase not in JOB_PHASES[key]:
            assert bars == []
            continue
        assert {bar.total for bar in bars} == {IMAGES[run.parent.name]}
        done = [bar.done for bar in bars]
        assert done == sorted(done) and done[0] <= 1 and done[-1] == bars[-1].total
        # each bar comes after its phase started and before the next one did
        started = events.index(PrepStarted(phase))
        assert all(started < events.index(bar) for bar in bars)
    # no bar counts for a phase once training started: the sampler's bars (run 02) are not caching
    first_step = next((i for i, e in enumerate(events) if isinstance(e, StepProgress)), len(events))
    assert not any(isinstance(e, (PrepProgress, PrepStarted)) for e in events[first_step:])


def test_prep_phase_follows_kohya_into_training() -> None:
    assert prep_phase(PHASE_TRAINING, PrepStarted(PHASE_LOADING_MODEL)) == PHASE_LOADING_MODEL
    assert prep_phase(PHASE_CACHING_LATENTS, PrepProgress(PHASE_CACHING_LATENTS, 3, 8, 12)) == PHASE_CACHING_LATENTS
    assert prep_phase(PHASE_CACHING_TEXT, PrepStarted(PHASE_CREATING_LORA)) == PHASE_CREATING_LORA
    for start in (TotalSteps(16), EpochStarted(1, 2), steps(0, 16, None, 0, None)):
        assert prep_phase(PHASE_CREATING_LORA, start) == PHASE_TRAINING
    # the previews are the runner's: prep_phase leaves them alone
    assert prep_phase(PHASE_PREVIEW, steps(17, 32, 1.1, 15, 14)) == PHASE_PREVIEW
    assert set(PREP_PHASES) == set(BEFORE_TRAINING)


def test_tracker_counts_only_the_caching_loop_bar() -> None:
    # The real order of run 14's stdout and stderr: kohya's validity check draws a bar of its own first.
    tracker = ProgressTracker()
    lines = [
        "caching Text Encoder outputs with caching strategy.",
        "checking cache validity...",
        "  0%|          | 0/8 [00:00<?, ?it/s]",
        "100%|██████████| 8/8 [00:00<00:00, 152520.15it/s]",
        "caching Text Encoder outputs...",
        "  0%|          | 0/8 [00:00<?, ?it/s]",
        " 12%|█▎        | 1/8 [00:01<00:09,  1.31s/it]",
        "100%|██████████| 8/8 [00:11<00:00,  1.46s/it]",
        "100%|██████████| 8/8 [00:11<00:00,  1.46s/it]",
        "move vae and unet back to original device",
        "import network module: networks.lora",
        " 50%|█████     | 2/4 [00:08<00:08,  4.25s/it]",
    ]
    assert feed_all(tracker, lines) == [
        PrepStarted(PHASE_CACHING_TEXT),
        PrepProgress(PHASE_CACHING_TEXT, 0, 8, None),
        PrepProgress(PHASE_CACHING_TEXT, 1, 8, 9),
        PrepProgress(PHASE_CACHING_TEXT, 8, 8, 0),
        PrepStarted(PHASE_CREATING_LORA),
    ]
    assert tracker.prep_phase == PHASE_CREATING_LORA


def test_output_parser_reports_the_caching_bar_it_is_still_drawing() -> None:
    parser = OutputParser()
    assert parser.feed("stdout", "caching latents...\n").events == [PrepStarted(PHASE_CACHING_LATENTS)]
    bar = "\r 25%|██▌       | 2/8 [00:11<00:31,  5.32s/it]"
    assert parser.feed("stderr", bar[:-1]).events == []  # not whole yet
    assert parser.feed("stderr", bar[-1]).events == [PrepProgress(PHASE_CACHING_LATENTS, 2, 8, 31)]
    assert parser.feed("stderr", "\r").events == []  # the same redraw, now a line: not again


SDXL_OK = SDXL_LOGS / "01_ok_unet_only_2ep"
SDXL_SAMPLES = SDXL_LOGS / "02_ok_unet_only_2ep_samples"


@pytest.mark.skipif(not SDXL_OK.is_dir(), reason="real SDXL kohya logs not available")
@pytest.mark.parametrize("mode", ["streams", "combined"])
def test_real_sdxl_steps_epochs_and_checkpoints(mode: str) -> None:
    result = replay(SDXL_OK, mode)
    bars = {e.step: e for e in step_events(result.events)}  # the last draw of each step
    # `1/16 [00:16<04:11, 16.79s/it, avr_loss=1.06]`: s/it turned into steps per second
    assert bars[1] == steps(1, 16, pytest.approx(1 / 16.79), 16, 4 * 60 + 11, 1.06)
    assert bars[8] == steps(8, 16, pytest.approx(1 / 12.12), 96, 96, 1.09)
    assert bars[16] == steps(16, 16, pytest.approx(1 / 15.13), 4 * 60 + 2, 0, 1.08)
    assert sorted(bars) == list(range(17))
    tracker = result.tracker
    assert (tracker.total_steps, tracker.epoch, tracker.epochs, tracker.step) == (16, 2, 2, 16)
    # the epoch-1 checkpoint comes after step 8 and before epoch 2, as for SD 1.x
    order = [e for e in result.events if isinstance(e, (CheckpointSaved, EpochStarted, ModelSaved))]
    assert [Path(e.path).name if isinstance(e, CheckpointSaved) else e for e in order] == [
        EpochStarted(1, 2), "sdxl_lora-000001.safetensors", EpochStarted(2, 2), "sdxl_lora.safetensors", ModelSaved()]
    saved_at = result.events.index(order[1])
    assert max(e.step for e in step_events(result.events[:saved_at])) == 8


@pytest.mark.skipif(not SDXL_SAMPLES.is_dir(), reason="real SDXL kohya logs not available")
@pytest.mark.parametrize("mode", ["streams", "combined"])
def test_real_sdxl_sample_bars_leave_the_steps_alone(mode: str) -> None:
    # The sampler's nested bars (`\n\r<bar>\x1b[A`, 4 steps per picture) and torch's UserWarning come after
    # the last step: no step, total, error or caching progress may come out of them.
    result = replay(SDXL_SAMPLES, mode)
    events = result.events
    started = events.index(SampleImagesStarted(16))
    after = events[started:]
    assert {(e.step, e.total) for e in step_events(after)} <= {(16, 16)}
    assert {e.total for e in step_events(events)} == {16}
    assert not any(isinstance(e, (PrepProgress, ErrorLine)) for e in after)
    assert result.tracker.errors == ()
    assert any("UserWarning: None of the inputs have requires_grad=True" in line for line in result.lines)
    assert job_phases(events)[-2:] == [PHASE_PREVIEW, PHASE_TRAINING]
