"""daemon.pipeline.failure: which failure a finished run gets, and what the user is told.

Every run here is described the way the runner sees it: exit status, cancel flag, output check, the
tracker's error lines and the tail of the output. Lines are copied from real kohya output where the
fixtures have them (shared/kohya-logs) and from sd-scripts' messages (shared/reference/kohya.md §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.pipeline.failure import (
    BAD_ARGUMENTS,
    BAD_DATASET,
    BAD_DATASET_CONFIG,
    CANCELLED,
    DISK_FULL,
    FAILURE_KINDS,
    KILLED,
    MISSING_DEPENDENCY,
    MODEL_INCOMPATIBLE,
    MODEL_NOT_FOUND,
    NAN_LOSS,
    NETWORK_ERROR,
    NO_DATA,
    NO_OUTPUT,
    OUT_OF_MEMORY,
    TOKENIZER_MISSING,
    TRAINER_CRASHED,
    Failure,
    classify_failure,
)
from daemon.pipeline.progress import ERR_NAN_LOSS, ErrorLine, ProgressTracker
from daemon.pipeline.runner import job_tail
from tests.test_progress import LOGS_DIR, listed_loras, replay, run_facts

KERNELS_WARNING = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. "
    "Please make sure you already `pip install kernels` and the kernels >= 0.11.1"
)
TRACEBACK = "Traceback (most recent call last):"
FRAME = '  File "/sd-scripts/train_network.py", line 1913, in <module>'
LAUNCHER_FAILED = (
    "subprocess.CalledProcessError: Command '['/venv/bin/python3', 'train_network.py', '--output_dir', "
    "'/jobs/1/out']' returned non-zero exit status 1."
)


def crash_tail(*exception: str, wrapped: bool = False) -> list[str]:
    """A traceback ending in `exception`; `wrapped` adds accelerate's own traceback after it."""
    lines = [KERNELS_WARNING, TRACEBACK, FRAME, "    trainer.train(args)", *exception]
    if wrapped:
        lines += [TRACEBACK, '  File "/venv/bin/accelerate", line 6, in <module>', LAUNCHER_FAILED]
    return lines


@dataclass(frozen=True)
class Run:
    exit_code: int | None = 1
    cancelled: bool = False
    model_saved: bool = False
    output_exists: bool = False
    errors: Sequence[ErrorLine] = ()
    tail: Sequence[str] = field(default_factory=list)

    def classify(self) -> Failure | None:
        return classify_failure(
            exit_code=self.exit_code,
            cancelled=self.cancelled,
            model_saved=self.model_saved,
            output_exists=self.output_exists,
            errors=self.errors,
            tail=self.tail,
        )


DONE = Run(exit_code=0, model_saved=True, output_exists=True)

# (id, run, expected kind or None, words the message must contain)
CASES: list[tuple[str, Run, str | None, tuple[str, ...]]] = [
    ("clean run", DONE, None, ()),
    ("clean run with a harmless warning", Run(0, False, True, True, tail=[KERNELS_WARNING]), None, ()),
    ("cancel lost the race", Run(0, True, True, True), None, ()),
    (
        "nan loss still exits 0",
        Run(0, False, True, True, errors=[ErrorLine(ERR_NAN_LOSS, "avr_loss=nan at step 8")]),
        NAN_LOSS,
        ("NaN",),
    ),
    ("exit 0 without model saved", Run(0, False, False, False), NO_OUTPUT, ("without saving",)),
    ("model saved but file gone", Run(0, False, True, False), NO_OUTPUT, ("not there",)),
    (
        "no data exits 0",
        Run(0, tail=["                    ERROR    No data found. Please verify   train_network.py:576"]),
        NO_DATA,
        ("no training images",),
    ),
    ("cancel by SIGTERM", Run(143, cancelled=True), CANCELLED, ("cancelled",)),
    ("cancel by Popen -15", Run(-15, cancelled=True), CANCELLED, ("cancelled",)),
    ("cancel, child saved anyway", Run(143, True, True, True), CANCELLED, ("already saved",)),
    ("cancel beats an error line", Run(1, True, tail=crash_tail("KeyboardInterrupt")), CANCELLED, ()),
    ("SIGKILL from the kernel", Run(-9), KILLED, ("SIGKILL",)),
    ("SIGKILL as shell code", Run(137), KILLED, ("SIGKILL",)),
    ("SIGTERM without cancel", Run(143), KILLED, ("SIGTERM",)),
    ("SIGINT without cancel", Run(130, tail=crash_tail("KeyboardInterrupt")), KILLED, ("SIGINT",)),
    (
        "child killed under accelerate",
        Run(
            1,
            tail=[
                TRACEBACK,
                LAUNCHER_FAILED.replace("returned non-zero exit status 1", "died with <Signals.SIGKILL: 9>"),
            ],
        ),
        KILLED,
        ("SIGKILL",),
    ),
    ("segfault is a crash", Run(-11), TRAINER_CRASHED, ("SIGSEGV",)),
    (
        "cuda oom under accelerate",
        Run(
            1,
            tail=crash_tail(
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total "
                "capacity of 7.79 GiB of which 3.94 MiB is free.",
                wrapped=True,
            ),
        ),
        OUT_OF_MEMORY,
        ("out of memory",),
    ),
    (
        "disk full",
        Run(1, tail=crash_tail("OSError: [Errno 28] No space left on device")),
        DISK_FULL,
        ("space",),
    ),
    (
        "no bitsandbytes",
        Run(
            1,
            tail=crash_tail("ImportError: No bitsandbytes / bitsandbytesがインストールされていないようです"),
        ),
        MISSING_DEPENDENCY,
        ("bitsandbytes",),
    ),
    (
        "no xformers",
        Run(1, tail=crash_tail("ImportError: No xformers / xformersがインストールされていないようです")),
        MISSING_DEPENDENCY,
        ("xformers",),
    ),
    (
        "module missing",
        Run(1, tail=crash_tail("ModuleNotFoundError: No module named 'prodigyopt'")),
        MISSING_DEPENDENCY,
        ("prodigyopt",),
    ),
    (
        "model path is not a repo id",
        Run(
            1,
            tail=crash_tail(
                'ValueError: The provided pretrained_model_name_or_path "/models/gone.safetensors" '
                "is neither a valid local path nor a valid repo id. Please check the parameter."
            ),
        ),
        MODEL_NOT_FOUND,
        ("/models/gone.safetensors",),
    ),
    (
        "model not found message",
        Run(1, tail=["model is not found as a file or in Hugging Face, perhaps file name is wrong?"]),
        MODEL_NOT_FOUND,
        ("base model",),
    ),
    (
        "sdxl checkpoint as sd1",
        Run(
            1,
            tail=crash_tail(
                "RuntimeError: Error(s) in loading state_dict for UNet2DConditionModel:",
                "\tsize mismatch for conv_in.weight: copying a param with shape torch.Size([320, 9, 3, 3])",
            ),
        ),
        MODEL_INCOMPATIBLE,
        ("not the kind the trainer expected", "SD 1.x trainer", "inpainting"),
    ),
    (
        "tokenizer offline",
        Run(
            1,
            tail=crash_tail(
                '  File "/sd-scripts/library/strategy_base.py", line 65, in _load_tokenizer',
                "TypeError: expected str, bytes or os.PathLike object, not NoneType",
            ),
        ),
        TOKENIZER_MISSING,
        ("tokenizer",),
    ),
    (
        "tokenizer cannot be loaded",
        Run(1, tail=crash_tail("OSError: Can't load tokenizer for 'openai/clip-vit-large-patch14'.")),
        TOKENIZER_MISSING,
        ("tokenizer",),
    ),
    (
        "network without tokenizer frame",
        Run(
            1,
            tail=crash_tail(
                "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='huggingface.co', port=443)"
            ),
        ),
        NETWORK_ERROR,
        ("Hugging Face",),
    ),
    (
        "dataset config rejected",
        Run(
            1,
            tail=[
                "2026-11-26 15:14:23 ERROR    Invalid user config / ユーザ設定の     config_util.py:389",
                *crash_tail(
                    "voluptuous.error.MultipleInvalid: extra keys not allowed @ "
                    "data['datasets'][0]['subsets'][0]['name']"
                ),
            ],
        ),
        BAD_DATASET_CONFIG,
        ("extra keys not allowed",),
    ),
    (
        "empty caption",
        Run(
            1,
            tail=crash_tail(
                "AssertionError: caption file is empty / キャプションファイルが空です: /img/a.txt"
            ),
        ),
        BAD_DATASET,
        ("caption",),
    ),
    (
        "argparse under accelerate",
        Run(
            1,
            tail=[
                "train_network.py: error: argument --optimizer_type: expected one argument",
                TRACEBACK,
                LAUNCHER_FAILED,
            ],
        ),
        BAD_ARGUMENTS,
        ("expected one argument",),
    ),
    (
        "script missing",
        Run(
            1,
            tail=[
                "/venv/bin/python3: can't open file '/sd/train_network_typo.py': "
                "[Errno 2] No such file or directory",
                TRACEBACK,
                LAUNCHER_FAILED,
            ],
        ),
        BAD_ARGUMENTS,
        ("/sd/train_network_typo.py",),
    ),
    (
        "unknown crash names the child's exception",
        Run(
            1,
            tail=crash_tail("ValueError: scheduler constant does not require num_warmup_steps", wrapped=True),
        ),
        TRAINER_CRASHED,
        ("ValueError: scheduler constant",),
    ),
    (
        "crash found through tracker errors only",
        Run(
            1,
            errors=[ErrorLine("traceback", TRACEBACK), ErrorLine("exception", "KeyError: 'ss_network_dim'")],
        ),
        TRAINER_CRASHED,
        ("KeyError",),
    ),
    ("crash without any output", Run(1), TRAINER_CRASHED, ("exit code 1",)),
    ("exit status unknown", Run(None), TRAINER_CRASHED, ("no exit status",)),
    ("harmless warning is no dependency problem", Run(1, tail=[KERNELS_WARNING]), TRAINER_CRASHED, ()),
]


@pytest.mark.parametrize(("run", "kind", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classify_failure(run: Run, kind: str | None, words: tuple[str, ...]) -> None:
    failure = run.classify()
    assert (failure.kind if failure else None) == kind, failure
    for word in words:
        assert failure is not None
        assert word in failure.message


@pytest.mark.parametrize(
    ("run", "kind"), [(c[1], c[2]) for c in CASES if c[2]], ids=[c[0] for c in CASES if c[2]]
)
def test_failure_reads_as_advice(run: Run, kind: str) -> None:
    failure = run.classify()
    assert failure is not None
    assert failure.kind in FAILURE_KINDS
    assert failure.message[:1].isupper()
    assert failure.message.endswith((".", "…"))
    assert len(failure.message) <= 400
    assert failure.hint and failure.hint[:1].isupper()
    assert "Traceback" not in failure.message


def test_oom_hint_says_what_to_lower() -> None:
    failure = Run(1, tail=crash_tail("torch.OutOfMemoryError: CUDA out of memory.")).classify()
    assert failure is not None
    assert "batch size" in failure.hint
    assert "resolution" in failure.hint


def test_tokenizer_hint_names_the_setting() -> None:
    failure = Run(1, tail=["OSError: Can't load tokenizer for 'openai/clip-vit-large-patch14'."]).classify()
    assert failure is not None
    assert "kohya.tokenizer_cache_dir" in failure.hint


def test_long_exception_is_shortened() -> None:
    failure = Run(1, tail=crash_tail("RuntimeError: " + "x" * 2000)).classify()
    assert failure is not None
    assert failure.kind == TRAINER_CRASHED
    assert len(failure.message) < 400
    assert failure.message.endswith("…")


def test_tracker_errors_and_tail_agree() -> None:
    """What the runner actually passes: the tracker's errors plus the tail of the same lines."""
    lines = [
        "steps:   3%|▎         | 1/32 [00:01<00:40,  1.30s/it, avr_loss=0.12]"
        "Traceback (most recent call last):",
        '  File "/sd-scripts/train_network.py", line 1445, in train',
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB.",
    ]
    tracker = ProgressTracker()
    for line in lines:
        tracker.feed_line(line)
    for errors, tail in ((tracker.errors, ()), ((), lines), (tracker.errors, lines)):
        failure = Run(1, errors=errors, tail=tail).classify()
        assert failure is not None
        assert failure.kind == OUT_OF_MEMORY


# --- the real SDXL failures (shared/kohya-logs/cpu-sdxl): what the user reads --------------------------------

SDXL_LOGS = LOGS_DIR / "cpu-sdxl"

# (run, kind, words of the message, words of the hint)
SDXL_FAILURES: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    (
        "10_fail_sd15_checkpoint_to_sdxl_script",
        MODEL_INCOMPATIBLE,
        ("The base model is not the kind the trainer expected", "the SDXL trainer was given", "not SDXL"),
        ("should not happen", "report"),
    ),
    (
        "11_fail_sdxl_checkpoint_to_sd15_script",
        MODEL_INCOMPATIBLE,
        ("The base model is not the kind the trainer expected: the SD 1.x trainer was given an SDXL model.",),
        ("should not happen", "report"),
    ),
    (
        "12_fail_cache_te_outputs_with_te_training",
        BAD_ARGUMENTS,
        ("text encoders were to be trained while their outputs were cached",),
        ("bug in the daemon", "text_encoder_lr to 0"),
    ),
    (
        "13_fail_no_bigg_tokenizer_offline",
        TOKENIZER_MISSING,
        ("SDXL's second tokenizer",),
        ("`kohya.tokenizer_cache_dir` (/home/user/lab/.harness/tokenizers-clip-l-only)",
         "subfolder laion_CLIP-ViT-bigG-14-laion2B-39B-b160k", "next to openai_clip-vit-large-patch14"),
    ),
    (
        "14_fail_fp8_base_without_mixed_precision",
        BAD_ARGUMENTS,
        ("fp8 (fp8_base) needs mixed precision fp16 or bf16",),
        ("mixed_precision to fp16 or bf16", "bug in the daemon"),
    ),
    (
        "30_oom_killed_unet_only_2ep",
        KILLED,
        ("killed by the operating system (SIGKILL)", "ran out of memory (RAM)"),
        ("SDXL model on the CPU needs about 16 GB of free RAM", "11 GB with bf16"),
    ),
]


def real_failure(run: Path, *, arch: str | None = "sdxl", on_gpu: bool | None = False) -> Failure | None:
    """What the runner decides: the tracker's errors and the tail of trainer.log (both pipes, as they came)."""
    exit_code, cancelled = run_facts(run)
    tracker = replay(run, "streams").tracker
    final = Path(tracker.checkpoints[-1]).name if tracker.checkpoints else None
    return classify_failure(
        exit_code=exit_code, cancelled=cancelled, model_saved=tracker.model_saved,
        output_exists=final is not None and final in (listed_loras(run) or set()),
        errors=tracker.errors, tail=job_tail(run / "combined.log"), arch=arch, on_gpu=on_gpu)


@pytest.mark.skipif(not SDXL_LOGS.is_dir(), reason="real SDXL kohya logs not available")
@pytest.mark.parametrize(("run", "kind", "message", "hint"), SDXL_FAILURES, ids=[f[0] for f in SDXL_FAILURES])
def test_real_sdxl_failure_is_one_sentence_with_advice(
        run: str, kind: str, message: tuple[str, ...], hint: tuple[str, ...]) -> None:
    failure = real_failure(SDXL_LOGS / run)
    assert failure is not None and failure.kind == kind, failure
    for words in message:
        assert words in failure.message
    for words in hint:
        assert words in failure.hint
    # never the traceback, the key lists (88-133 KB in runs 10 and 11) or kohya's Japanese copy
    text = failure.message + failure.hint
    assert len(failure.message) <= 300 and len(failure.hint) <= 400
    assert not any(word in text for word in ("Traceback", "state_dict", "Unexpected key", "AssertionError", "の"))


@pytest.mark.skipif(not SDXL_LOGS.is_dir(), reason="real SDXL kohya logs not available")
def test_real_sigkill_advice_follows_what_was_trained_where() -> None:
    run = SDXL_LOGS / "30_oom_killed_unet_only_2ep"
    hints = {(arch, on_gpu): real_failure(run, arch=arch, on_gpu=on_gpu) for arch in ("sdxl", "sd1", None)
             for on_gpu in (True, False, None)}
    assert {failure.kind for failure in hints.values() if failure} == {KILLED}
    assert all(failure and "ran out of memory (RAM)" in failure.message for failure in hints.values())
    cpu_sdxl = hints[("sdxl", False)]
    assert cpu_sdxl is not None and "16 GB" in cpu_sdxl.hint
    others = [failure.hint for key, failure in hints.items() if key != ("sdxl", False) and failure]
    assert not any("16 GB" in hint for hint in others)
    gpu_sdxl = hints[("sdxl", True)]
    assert gpu_sdxl is not None and "SDXL" in gpu_sdxl.hint
    sd1 = hints[("sd1", False)]
    assert sd1 is not None and "batch size" in sd1.hint and "SDXL" not in sd1.hint


def test_cpu_allocator_failure_is_ram_not_the_graphics_card() -> None:
    oom = "RuntimeError: [enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"
    failure = classify_failure(exit_code=1, cancelled=False, model_saved=False, output_exists=False, errors=(),
                               tail=crash_tail(oom), arch="sdxl", on_gpu=False)
    assert failure is not None and failure.kind == OUT_OF_MEMORY
    assert "RAM" in failure.message and "graphics card" not in failure.message
    assert "16 GB" in failure.hint
    cuda = Run(1, tail=crash_tail("torch.OutOfMemoryError: CUDA out of memory.")).classify()
    assert cuda is not None and "graphics card" in cuda.message


def test_tokenizer_hint_names_both_sdxl_folders_when_none_is_there() -> None:
    # SDXL without any tokenizer cache: the first (CLIP-L) load fails, in strategy_sdxl
    tail = [TRACEBACK,
            '  File "/sd-scripts/library/strategy_sdxl.py", line 24, in __init__',
            "    self.tokenizer1 = self._load_tokenizer(CLIPTokenizer, TOKENIZER1_PATH, tokenizer_cache_dir=None)",
            '  File "/sd-scripts/library/strategy_base.py", line 65, in _load_tokenizer',
            "TypeError: expected str, bytes or os.PathLike object, not NoneType"]
    failure = Run(1, tail=tail).classify()
    assert failure is not None and failure.kind == TOKENIZER_MISSING
    assert "openai_clip-vit-large-patch14 and laion_CLIP-ViT-bigG-14-laion2B-39B-b160k" in failure.hint
    sd1 = Run(1, tail=[line.replace("strategy_sdxl", "strategy_sd").replace("tokenizer1", "tokenizer")
                       .replace("TOKENIZER1_PATH", "TOKENIZER_ID") for line in tail]).classify()
    assert sd1 is not None and sd1.kind == TOKENIZER_MISSING and "bigG" not in sd1.hint


@pytest.mark.parametrize(("assertion", "words"), [
    ("when caching Text Encoder output, either caption_dropout_rate, shuffle_caption, token_warmup_step or "
     "caption_tag_dropout_rate cannot be used / Text Encoderの出力を", "shuffled or dropped"),
    ("bucket_reso_steps is 48. it must be divisible by 32.", "multiple of 32"),
    ("v2 cannot be enabled in SDXL training / SDXL学習ではv2を有効にすることはできません", "SD 2.x options"),
])
def test_other_sdxl_settings_asserts_are_the_daemons_bug(assertion: str, words: str) -> None:
    failure = Run(1, tail=crash_tail(f"AssertionError: {assertion}")).classify()
    assert failure is not None and failure.kind == BAD_ARGUMENTS
    assert words in failure.message and "bug in the daemon" in failure.hint
