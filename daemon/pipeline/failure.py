"""Explain why a kohya training run did not produce a LoRA, in words a non-expert can act on.

Pure: takes what the runner observed (exit status, cancel flag, output file check, the tracker's
error lines, the last lines of output) and returns a `Failure` or None.

kohya's exit code says little on its own: `No data found` exits 0, argparse exits 2, every exception
exits 1, and `accelerate launch` turns *any* child failure into exit 1 with a `CalledProcessError`.
So the kind comes from the trainer's own lines; the code only separates signals and clean exits.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from daemon.pipeline.progress import (
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
    ErrorLine,
    parse_line,
    split_glued_line,
)

# Failure kinds.
CANCELLED: Final = "cancelled"
KILLED: Final = "killed"
OUT_OF_MEMORY: Final = "out_of_memory"
DISK_FULL: Final = "disk_full"
MISSING_DEPENDENCY: Final = "missing_dependency"
MODEL_NOT_FOUND: Final = "model_not_found"
MODEL_INCOMPATIBLE: Final = "model_incompatible"
TOKENIZER_MISSING: Final = "tokenizer_missing"
NETWORK_ERROR: Final = "network_error"
BAD_DATASET_CONFIG: Final = "bad_dataset_config"
BAD_DATASET: Final = "bad_dataset"
NO_DATA: Final = "no_data"
BAD_ARGUMENTS: Final = "bad_arguments"
NAN_LOSS: Final = "nan_loss"
NO_OUTPUT: Final = "no_output"
TRAINER_CRASHED: Final = "trainer_crashed"

FAILURE_KINDS: Final[tuple[str, ...]] = (
    CANCELLED,
    KILLED,
    OUT_OF_MEMORY,
    DISK_FULL,
    MISSING_DEPENDENCY,
    MODEL_NOT_FOUND,
    MODEL_INCOMPATIBLE,
    TOKENIZER_MISSING,
    NETWORK_ERROR,
    BAD_DATASET_CONFIG,
    BAD_DATASET,
    NO_DATA,
    BAD_ARGUMENTS,
    NAN_LOSS,
    NO_OUTPUT,
    TRAINER_CRASHED,
)

_DETAIL_CHARS: Final = 300


@dataclass(frozen=True)
class Failure:
    kind: str
    message: str
    hint: str


def classify_failure(
    *,
    exit_code: int | None,
    cancelled: bool,
    model_saved: bool,
    output_exists: bool,
    errors: Sequence[ErrorLine],
    tail: Sequence[str],
    arch: str | None = None,
    on_gpu: bool | None = None,
) -> Failure | None:
    """None only for a clean run: exit 0, the LoRA file exists and `model saved.` was printed.

    `errors` are ProgressTracker.errors; `tail` the last lines of output (both streams). Error lines are
    also re-read from `tail`, so either one alone is enough to classify. `arch` (the job's base model family,
    "sd1" / "sdxl") and `on_gpu` (False: trained on the CPU) only sharpen the advice on memory: a run killed
    without a word is most likely out of RAM, and how much SDXL needs is worth saying.
    """
    lines = _error_lines(errors, tail)
    kinds = {line.kind for line in lines}
    produced = exit_code == 0 and output_exists and model_saved
    # A NaN loss still exits 0 and saves a file, but its weights are NaN: useless in Easy Diffusion.
    if produced and ERR_NAN_LOSS not in kinds:
        return None
    if cancelled:
        return _cancelled(saved_anyway=model_saved and output_exists)
    signum = _signal_number(exit_code, lines)
    if signum is not None and signum not in _CRASH_SIGNALS:
        return _killed(signum, _Machine(arch, on_gpu))
    cause = _failure_from_lines(_Evidence(lines, tail, _Machine(arch, on_gpu)))
    if cause is not None:
        return cause
    if exit_code == 0:
        return _no_output(model_saved)
    return _crashed(exit_code, signum, lines, tail)


# --- evidence ---------------------------------------------------------------------------------------


def _error_lines(errors: Sequence[ErrorLine], tail: Sequence[str]) -> list[ErrorLine]:
    found = list(errors)
    for line in tail:
        for part in split_glued_line(line):
            event = parse_line(part)
            if isinstance(event, ErrorLine) and event not in found:
                found.append(event)
    return found


def _first(lines: Iterable[ErrorLine], kind: str) -> ErrorLine | None:
    return next((line for line in lines if line.kind == kind), None)


# Signals a process gets from its own fault (SIGILL, SIGABRT, SIGBUS, SIGFPE, SIGSEGV; POSIX numbers),
# as opposed to being stopped from outside: those are crashes, explained like one.
_CRASH_SIGNALS: Final = frozenset({4, 6, 7, 8, 11})

_CHILD_SIGNAL = re.compile(r"died with <Signals\.\w+: (?P<num>\d+)>")


def _signal_number(exit_code: int | None, lines: Sequence[ErrorLine]) -> int | None:
    """Popen reports a signal as -N, a shell as 128+N; accelerate reports its child's in the error."""
    if exit_code is not None and exit_code < 0:
        return -exit_code
    if exit_code is not None and 128 < exit_code < 128 + 65:
        return exit_code - 128
    launcher = _first(lines, ERR_LAUNCHER)
    died = _CHILD_SIGNAL.search(launcher.message) if launcher else None
    return int(died.group("num")) if died else None


def _detail(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 1] + "…"


# --- kinds ------------------------------------------------------------------------------------------


def _cancelled(*, saved_anyway: bool) -> Failure:
    message = "Training was cancelled."
    if saved_anyway:
        # Seen when only the `accelerate` parent was signalled: the child ran on and saved (run 22).
        message = "Training was cancelled, although the trainer had already saved the LoRA."
    return Failure(CANCELLED, message, "Nothing needs fixing; start the job again when you want to.")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class _Machine:
    """What the runner knows about the run beyond its output (None: not told)."""

    arch: str | None
    on_gpu: bool | None


# shared/harness/README.md, "Timings and RAM": SDXL in fp32 on a CPU keeps the U-Net (10.3 GB), both text
# encoders (3.3 GB) and the VAE in RAM: about 16 GB free; 11 GB with bf16 (run 04, 9.6 GiB anonymous RSS).
_SDXL_CPU_RAM_HINT: Final = (
    "Training an SDXL model on the CPU needs about 16 GB of free RAM (about 11 GB with bf16 mixed precision): "
    "close other programs, Easy Diffusion included if it holds a model, or add swap space, then start the job "
    "again."
)


def _ram_hint(machine: _Machine) -> str:
    if machine.arch == "sdxl" and machine.on_gpu is False:
        return _SDXL_CPU_RAM_HINT
    if machine.arch == "sdxl":
        return ("SDXL needs far more RAM than SD 1.x while it loads the model (the checkpoint alone is about 7 GB): "
                "close other programs or add swap space, then start the job again.")
    return ("Close other programs, lower the batch size or resolution, or add swap space, then start the job "
            "again.")


def _killed(signum: int, machine: _Machine) -> Failure:
    name = _signal_name(signum)
    if name == "SIGKILL":
        # Nothing in the daemon sends SIGKILL without a cancel; the kernel's OOM killer does, and leaves no
        # traceback and nothing on stderr (shared/kohya-logs/cpu-sdxl/30: exit 137 after 11 silent minutes).
        return Failure(
            KILLED,
            f"The trainer was killed by the operating system ({name}), most likely because the computer ran "
            "out of memory (RAM).",
            _ram_hint(machine),
        )
    return Failure(
        KILLED,
        f"The trainer was stopped from outside the daemon ({name}).",
        "Something else stopped it (a shutdown, a logout or another program); start the job again.",
    )


@dataclass(frozen=True)
class _Evidence:
    lines: Sequence[ErrorLine]  # the tracker's error lines and those re-read from the tail
    tail: Sequence[str]
    machine: _Machine


def _failure_from_lines(evidence: _Evidence) -> Failure | None:
    # Most specific cause first: e.g. a tokenizer download failure also shows network errors.
    for kind, explain in _EXPLAINERS:
        line = _first(evidence.lines, kind)
        if line is not None:
            return explain(line, evidence)
    return None


def _out_of_memory(line: ErrorLine, evidence: _Evidence) -> Failure:
    if "DefaultCPUAllocator" in line.message:  # torch's CPU allocator: RAM, not the graphics card
        return Failure(OUT_OF_MEMORY, "The computer ran out of memory (RAM) during training.",
                       _ram_hint(evidence.machine))
    return Failure(
        OUT_OF_MEMORY,
        "The graphics card ran out of memory.",
        "Lower the batch size, the resolution or network_dim under Advanced; close other programs "
        "using the GPU (Easy Diffusion itself may be holding a model in VRAM).",
    )


def _disk_full(line: ErrorLine, evidence: _Evidence) -> Failure:
    return Failure(
        DISK_FULL,
        "The disk ran out of space during training.",
        "Free some space on the drive that holds the job and output folders, then start the job again.",
    )


_MISSING_MODULE = re.compile(r"No (?P<pkg>bitsandbytes|xformers)|No module named '(?P<mod>[^']+)'")


def _missing_dependency(line: ErrorLine, evidence: _Evidence) -> Failure:
    found = _MISSING_MODULE.search(line.message)
    package = (found.group("pkg") or found.group("mod")) if found else None
    what = f" ({package})" if package else ""
    return Failure(
        MISSING_DEPENDENCY,
        f"A Python package the trainer needs is not installed{what}.",
        "Install it into the sd-scripts Python environment, or pick settings that do not need it "
        "(the AdamW optimizer instead of AdamW8bit, SDPA instead of xformers).",
    )


_MODEL_PATH = re.compile(r'pretrained_model_name_or_path "(?P<path>[^"]+)"')


def _model_not_found(line: ErrorLine, evidence: _Evidence) -> Failure:
    found = _MODEL_PATH.search(line.message)
    what = f" ({found.group('path')})" if found else ""
    return Failure(
        MODEL_NOT_FOUND,
        f"The base model could not be found{what}.",
        "Check that the model file still exists and pick it again; use a .safetensors or .ckpt checkpoint.",
    )


# `Error(s) in loading state_dict for <class>:` names the model kohya built from the script's family.
_STATE_DICT_CLASS = re.compile(r"Error\(s\) in loading state_dict for (?P<cls>\w+)")
# A size mismatch on a cross-attention key gives the checkpoint's text width: 2048 SDXL, 1024 SD 2.x, 768 SD 1.x.
_CROSS_ATTENTION = re.compile(
    r"attn2\.to_[kv]\.weight: copying a param with shape torch\.Size\(\[\d+, (?P<dim>\d+)\]\)")
_FAMILY_BY_WIDTH: Final = {"2048": "an SDXL model", "1024": "an SD 2.x model", "768": "an SD 1.x model"}


def _model_incompatible(line: ErrorLine, evidence: _Evidence) -> Failure:
    # kohya follows this with every key of the model (88–133 KB, shared/kohya-logs/cpu-sdxl runs 10 and 11):
    # the user gets one sentence, the log keeps the rest.
    messages = [other.message for other in evidence.lines]
    built = next((m.group("cls") for t in messages if (m := _STATE_DICT_CLASS.search(t))), None)
    width = next((m.group("dim") for t in messages if (m := _CROSS_ATTENTION.search(t))), None)
    given = _FAMILY_BY_WIDTH.get(width or "")
    if built == "SdxlUNet2DConditionModel":
        what = f"the SDXL trainer was given {given or 'a model that is not SDXL (most likely SD 1.x or 2.x)'}"
    elif built is not None:
        what = f"the SD 1.x trainer was given {given or 'a model of another kind (SDXL, SD 2.x or inpainting)'}"
    else:
        what = "its weights do not fit the trainer's model"
    return Failure(
        MODEL_INCOMPATIBLE,
        f"The base model is not the kind the trainer expected: {what}.",
        "The daemon picks the trainer from the model file's contents, so this should not happen: check that "
        "the file is a complete SD 1.x or SDXL checkpoint (not a LoRA, VAE or inpainting model), pick it again, "
        "and report the log if it happens again.",
    )


# sd-scripts' tokenizer ids and the folder it looks for in --tokenizer_cache_dir (`/` becomes `_`).
_CLIP_L_FOLDER: Final = "openai_clip-vit-large-patch14"
_BIGG_FOLDER: Final = "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"
# strategy_sdxl loads `self.tokenizer2 = self._load_tokenizer(CLIPTokenizer, TOKENIZER2_PATH, ...)`; offline,
# the download of laion/CLIP-ViT-bigG-14-laion2B-39B-b160k fails (shared/kohya-logs/cpu-sdxl/13).
_BIGG_FAILED = re.compile(r"tokenizer2|TOKENIZER2_PATH|CLIP-ViT-bigG")
_SDXL_TRACE = re.compile(r"sdxl_train_network\.py|strategy_sdxl\.py")
_CACHE_DIR = re.compile(r"load tokenizer from cache: (?P<dir>.+)[\\/]" + re.escape(_CLIP_L_FOLDER) + r"\s*$")


def _tokenizer_missing(line: ErrorLine, evidence: _Evidence) -> Failure:
    text = [other.message for other in evidence.lines] + list(evidence.tail)
    cache = next((m.group("dir") for t in text if (m := _CACHE_DIR.search(t))), None)
    where = f"the folder set as `kohya.tokenizer_cache_dir` ({cache})" if cache else (
        "a folder set as `kohya.tokenizer_cache_dir` in the daemon config")
    if any(_BIGG_FAILED.search(t) for t in text):
        return Failure(
            TOKENIZER_MISSING,
            "The trainer could not load SDXL's second tokenizer (OpenCLIP bigG): it is not stored on this "
            "computer and could not be downloaded.",
            f"Put the tokenizer of laion/CLIP-ViT-bigG-14-laion2B-39B-b160k into {where}, as the subfolder "
            f"{_BIGG_FOLDER}, next to {_CLIP_L_FOLDER}; one SDXL run with internet access fills it.",
        )
    folders = f"{_CLIP_L_FOLDER} and {_BIGG_FOLDER}" if any(_SDXL_TRACE.search(t) for t in text) else _CLIP_L_FOLDER
    return Failure(
        TOKENIZER_MISSING,
        "The trainer could not load the CLIP tokenizer: "
        "it is not stored on this computer and could not be downloaded.",
        f"Set `kohya.tokenizer_cache_dir` in the daemon config to a folder holding the tokenizer "
        f"({folders}); one run with internet access and that setting fills it.",
    )


def _network_error(line: ErrorLine, evidence: _Evidence) -> Failure:
    return Failure(
        NETWORK_ERROR,
        "The trainer tried to download files from Hugging Face and could not connect.",
        "Use a base model stored on this computer and set `kohya.tokenizer_cache_dir`, "
        "or connect to the internet and start the job again.",
    )


def _bad_dataset_config(line: ErrorLine, evidence: _Evidence) -> Failure:
    # "Invalid user config" says nothing; voluptuous names the offending key.
    specific = [other.message for other in evidence.lines if other.message.startswith("voluptuous.error.")]
    detail = specific[0].split(": ", 1)[-1] if specific else line.message
    return Failure(
        BAD_DATASET_CONFIG,
        f"The trainer rejected the dataset settings the daemon wrote ({_detail(detail)}).",
        "This is a bug in the daemon or a mismatch with your sd-scripts version; "
        "please report it with the log.",
    )


def _bad_dataset(line: ErrorLine, evidence: _Evidence) -> Failure:
    return Failure(
        BAD_DATASET,
        "One of the caption files is empty.",
        "Write a caption into every caption file or delete the empty ones, then start the job again.",
    )


def _no_data(line: ErrorLine, evidence: _Evidence) -> Failure:
    return Failure(
        NO_DATA,
        "The trainer found no training images.",
        "Add images (png, jpg or webp) to the job's dataset and check that its folder is set correctly.",
    )


_SCRIPT_PATH = re.compile(r"can't open file '(?P<path>[^']+)'")


def _script_not_found(line: ErrorLine, evidence: _Evidence) -> Failure:
    # Treated as bad arguments: the launcher was handed a script path that does not exist (run 14).
    found = _SCRIPT_PATH.search(line.message)
    what = f" ({found.group('path')})" if found else ""
    return Failure(
        BAD_ARGUMENTS,
        f"The training script could not be found{what}.",
        "Check the sd-scripts folder in the daemon config: it must be a kohya-ss/sd-scripts checkout "
        "containing train_network.py.",
    )


def _bad_arguments(line: ErrorLine, evidence: _Evidence) -> Failure:
    detail = line.message.split(": error: ", 1)[-1]
    return Failure(
        BAD_ARGUMENTS,
        f"The trainer rejected the options it was started with ({_detail(detail)}).",
        "Your sd-scripts version probably differs from the one this daemon supports: install the "
        "supported version, or report this as a bug.",
    )


_DAEMON_BUG: Final = "This is a bug in the daemon; please report it with the log."
# (what kohya's assert says, what the user is told, what to do) for ERR_SETTINGS_CONFLICT.
_CONFLICTS: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "network for Text Encoder cannot be trained with caching",
        "The trainer refused its settings: the text encoders were to be trained while their outputs were "
        "cached, which cannot go together.",
        f"{_DAEMON_BUG} To train now, set text_encoder_lr to 0 under Advanced (the U-Net alone is trained).",
    ),
    (
        "when caching Text Encoder output, either",
        "The trainer refused its settings: captions cannot be shuffled or dropped while the text encoders' "
        "outputs are cached.",
        _DAEMON_BUG,
    ),
    (
        "fp8_base requires mixed precision",
        "The trainer refused its settings: loading the base model in fp8 (fp8_base) needs mixed precision "
        "fp16 or bf16.",
        "Set mixed_precision to fp16 or bf16 under Advanced, or pick a memory tier without fp8. If you changed "
        "neither, this is a bug in the daemon; please report it with the log.",
    ),
    (
        "bucket_reso_steps is",
        "The trainer refused its settings: SDXL needs a bucket step that is a multiple of 32.",
        _DAEMON_BUG,
    ),
    (
        "v2 cannot be enabled in SDXL training",
        "The trainer refused its settings: the SDXL trainer was started with SD 2.x options.",
        _DAEMON_BUG,
    ),
)


def _settings_conflict(line: ErrorLine, evidence: _Evidence) -> Failure:
    # The daemon chooses these options itself, so each of these is its mistake (or an Advanced override).
    for words, message, hint in _CONFLICTS:
        if words in line.message:
            return Failure(BAD_ARGUMENTS, message, hint)
    detail = line.message.split(": ", 1)[-1].split(" / ", 1)[0]  # kohya adds a Japanese copy after ` / `
    return Failure(BAD_ARGUMENTS, f"The trainer refused its settings ({_detail(detail)}).", _DAEMON_BUG)


def _nan_loss(line: ErrorLine, evidence: _Evidence) -> Failure:
    return Failure(
        NAN_LOSS,
        "Training went wrong: the loss became NaN, so the LoRA would be broken.",
        "Lower the learning rate, or use bf16 (or no mixed precision) instead of fp16, and start again.",
    )


_Explainer: TypeAlias = Callable[[ErrorLine, _Evidence], Failure]

_EXPLAINERS: Final[tuple[tuple[str, _Explainer], ...]] = (
    (ERR_OUT_OF_MEMORY, _out_of_memory),
    (ERR_DISK_FULL, _disk_full),
    (ERR_MISSING_DEPENDENCY, _missing_dependency),
    (ERR_MODEL_NOT_FOUND, _model_not_found),
    (ERR_MODEL_MISMATCH, _model_incompatible),
    (ERR_TOKENIZER, _tokenizer_missing),
    (ERR_NETWORK, _network_error),
    (ERR_SETTINGS_CONFLICT, _settings_conflict),
    (ERR_BAD_DATASET_CONFIG, _bad_dataset_config),
    (ERR_BAD_DATASET, _bad_dataset),
    (ERR_NO_DATA, _no_data),
    (ERR_SCRIPT_NOT_FOUND, _script_not_found),
    (ERR_BAD_ARGUMENTS, _bad_arguments),
    (ERR_NAN_LOSS, _nan_loss),
)


def _no_output(model_saved: bool) -> Failure:
    if model_saved:
        return Failure(
            NO_OUTPUT,
            "The trainer reported saving the LoRA, but the file is not there.",
            "Check that the output folder is writable and not cleaned by another program "
            "(some antivirus tools quarantine new files).",
        )
    return Failure(
        NO_OUTPUT,
        "The trainer finished without saving a LoRA.",
        "Look at the end of the log for the reason; check the dataset and the training length.",
    )


# --- fallback ---------------------------------------------------------------------------------------


def _crashed(
    exit_code: int | None, signum: int | None, lines: Sequence[ErrorLine], tail: Sequence[str]
) -> Failure:
    reason = _crash_reason(lines, tail)
    if reason is None and signum is not None:
        reason = f"it was stopped by {_signal_name(signum)}"
    elif reason is None:
        reason = "it stopped with " + ("no exit status" if exit_code is None else f"exit code {exit_code}")
    reason = _detail(reason)
    return Failure(
        TRAINER_CRASHED,
        f"The trainer crashed: {reason}" + ("" if reason.endswith((".", "!", "?", "…")) else "."),
        "See the log for details; if it happens again with the same settings, report it with the log.",
    )


def _crash_reason(lines: Sequence[ErrorLine], tail: Sequence[str]) -> str | None:
    """The child's last exception; accelerate's CalledProcessError only wraps it, so it comes last."""
    candidates = _exception_lines(tail) or [line.message for line in lines if line.kind == ERR_EXCEPTION]
    for candidate in reversed(candidates):
        if not candidate.startswith("subprocess.CalledProcessError"):
            return candidate
    return candidates[-1] if candidates else None


def _exception_lines(tail: Sequence[str]) -> list[str]:
    """Python ends each traceback with the first unindented line after its header."""
    found: list[str] = []
    in_traceback = False
    for line in tail:
        for part in split_glued_line(line):
            if "Traceback (most recent call last):" in part:
                in_traceback = True
            elif in_traceback and part.strip() and not part[:1].isspace():
                found.append(part.strip())
                in_traceback = False
    return found
