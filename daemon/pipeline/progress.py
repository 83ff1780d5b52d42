"""Turn the console output of kohya-ss sd-scripts `train_network.py` into progress events.

Pure: no I/O, no clock. The caller reads the trainer's pipes and feeds text in.

    raw text chunks ──LineSplitter──▶ lines ──ProgressTracker──▶ [ProgressEvent, ...]
                                                  └─ parse_line() per line (stateless)

What the real output looks like (see shared/kohya-logs/*/ and shared/reference/kohya.md §4):

- stdout carries kohya's `print()`s: `total optimization steps / 学習ステップ数: 32`, `epoch 1/2`,
  `saving checkpoint: <path>`; with `--console_log_simple` also every log message, plain.
- stderr carries Rich log records (`2026-11-26 15:13:30 INFO     message     file.py:123`, timestamp blank
  when it repeats, wrapped onto 29-space-indented continuation lines at 80 columns), every tqdm bar and
  Python warnings/tracebacks.
- tqdm redraws with `\\r` and never ends the bar with a newline, so whatever is written next lands on the
  same line: `steps: ... avr_loss=1.16]2026-11-26 15:13:54 INFO     model saved.   train_network.py:1729`
  or `... avr_loss=1.23]Traceback (most recent call last):`. `split_glued_line` undoes that.

Speed matters: a chatty trainer can print tens of MB. Each line is cut into parts and each part parsed
once; cheap substring checks decide which regexes can match at all, so a plain log line costs a few
`in` tests and at most one search over the error rules. `OutputParser` is what the daemon runs (in a
worker thread): both pipes in, log lines and events out, including the bar tqdm is still drawing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final, TypeAlias

# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TotalSteps:
    """`total optimization steps / 学習ステップ数: N` (stdout, before training starts)."""

    total: int


@dataclass(frozen=True)
class EpochStarted:
    """`epoch E/N` (stdout), printed at the start of each epoch, 1-based."""

    epoch: int
    epochs: int


@dataclass(frozen=True)
class StepProgress:
    """One redraw of the `steps:` tqdm bar."""

    step: int
    total: int
    rate: float | None  # optimisation steps per second (tqdm's `s/it` is inverted); None while `?`
    elapsed_s: float | None
    eta_s: float | None
    loss: float | None  # kohya's moving-average `avr_loss`; None when absent, float('nan') when `nan`


@dataclass(frozen=True)
class CheckpointSaved:
    """`saving checkpoint: <path>`: printed just before the file is written (epoch, step or final save)."""

    path: str


@dataclass(frozen=True)
class ModelSaved:
    """`model saved.`: the final save finished. Half of kohya's success signal (with exit 0)."""


@dataclass(frozen=True)
class SampleImagesStarted:
    """`generating sample images at step / サンプル画像生成 ステップ: N`."""

    step: int | None


@dataclass(frozen=True)
class PrepStarted:
    """kohya moved on to one of the phases before the first step (one of PREP_PHASES)."""

    phase: str


@dataclass(frozen=True)
class PrepProgress:
    """One redraw of the unnamed tqdm bar of a caching phase: `done` of `total` images (or captions)."""

    phase: str
    done: int
    total: int
    eta_s: float | None


@dataclass(frozen=True)
class ErrorLine:
    """A line that signals a known failure; `kind` is one of the ERR_* constants below."""

    kind: str
    message: str


ProgressEvent: TypeAlias = (
    TotalSteps
    | EpochStarted
    | StepProgress
    | CheckpointSaved
    | ModelSaved
    | SampleImagesStarted
    | PrepStarted
    | PrepProgress
    | ErrorLine
)

# Job phases (jobs.models.Progress.phase). Before its first step kohya loads the model, caches latents (with
# --cache_latents), caches the text encoders' outputs (SDXL with --cache_text_encoder_outputs) and creates the
# LoRA: on SDXL that takes minutes on a slow machine (95 s on the CPU of shared/kohya-logs/cpu-sdxl/01), so the
# tab shows what is going on instead of a step count stuck at 0. "training" and "preview" follow.
PHASE_LOADING_MODEL: Final = "loading_model"
PHASE_CACHING_LATENTS: Final = "caching_latents"
PHASE_CACHING_TEXT: Final = "caching_text_encoder_outputs"
PHASE_CREATING_LORA: Final = "creating_lora"
PHASE_TRAINING: Final = "training"
PHASE_PREVIEW: Final = "preview"
PREP_PHASES: Final[tuple[str, ...]] = (
    PHASE_LOADING_MODEL, PHASE_CACHING_LATENTS, PHASE_CACHING_TEXT, PHASE_CREATING_LORA)
_CACHING_PHASES: Final = frozenset({PHASE_CACHING_LATENTS, PHASE_CACHING_TEXT})

# ErrorLine kinds. failure.classify_failure maps them onto user-facing Failure kinds.
ERR_OUT_OF_MEMORY: Final = "out_of_memory"
ERR_NO_DATA: Final = "no_data"
ERR_TRACEBACK: Final = "traceback"  # a `Traceback (most recent call last):` header
ERR_EXCEPTION: Final = "exception"  # the exception line closing a traceback (found by ProgressTracker)
ERR_LAUNCHER: Final = "launcher"  # accelerate's CalledProcessError: the child failed, look at its lines
ERR_BAD_ARGUMENTS: Final = "bad_arguments"
ERR_SCRIPT_NOT_FOUND: Final = "script_not_found"
ERR_BAD_DATASET_CONFIG: Final = "bad_dataset_config"
ERR_BAD_DATASET: Final = "bad_dataset"
ERR_MISSING_DEPENDENCY: Final = "missing_dependency"
ERR_MODEL_NOT_FOUND: Final = "model_not_found"
ERR_MODEL_MISMATCH: Final = "model_mismatch"
ERR_TOKENIZER: Final = "tokenizer"
ERR_NETWORK: Final = "network"
ERR_DISK_FULL: Final = "disk_full"
ERR_NAN_LOSS: Final = "nan_loss"
ERR_SETTINGS_CONFLICT: Final = "settings_conflict"  # kohya's own assert on options that cannot go together

# Checked in order, first match wins, against the message with any Rich decoration removed.
# The launcher rule comes first because its line echoes the whole argv, and user paths or trigger
# words in there must not trip the other rules.
_ERROR_RULES: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    (ERR_LAUNCHER, re.compile(r"^subprocess\.CalledProcessError: ")),
    (ERR_TRACEBACK, re.compile(r"^Traceback \(most recent call last\):")),
    (
        ERR_OUT_OF_MEMORY,
        re.compile(
            r"CUDA out of memory|OutOfMemoryError|MPS backend out of memory"
            r"|DefaultCPUAllocator: (?:can't allocate|not enough memory)"
        ),
    ),
    (ERR_DISK_FULL, re.compile(r"No space left on device")),
    (ERR_NO_DATA, re.compile(r"^No data found\b")),
    # argparse prints `<prog>: error: <what>`; covers unrecognized arguments, invalid choice, required.
    (ERR_BAD_ARGUMENTS, re.compile(r"^[^\s:][^:]*: error: ")),
    (ERR_SCRIPT_NOT_FOUND, re.compile(r"can't open file .*No such file or directory")),
    (ERR_BAD_DATASET_CONFIG, re.compile(r"Invalid user config|^voluptuous\.error\.")),
    (ERR_BAD_DATASET, re.compile(r"caption file is empty")),
    # Anchored: every run prints "Failed to load CPU gemm_4bit_forward ...: No module named 'kernels'",
    # a harmless bitsandbytes warning that must not count as a missing dependency.
    (
        ERR_MISSING_DEPENDENCY,
        re.compile(r"No bitsandbytes|No xformers|^(?:ModuleNotFoundError|ImportError): "),
    ),
    (
        ERR_MODEL_NOT_FOUND,
        re.compile(
            r"is neither a valid local path nor a valid repo id"
            r"|model is not found as a file or in Hugging Face"
            r"|^[\w.]*HFValidationError: "
        ),
    ),
    (ERR_MODEL_MISMATCH, re.compile(r"Error\(s\) in loading state_dict|^size mismatch for ")),
    # sd-scripts checks these option pairs with `assert` (sdxl_train_network.assert_extra_args,
    # sdxl_train_util.verify_sdxl_training_args, train_network.train): shared/kohya-logs/cpu-sdxl runs 12 and 14.
    (
        ERR_SETTINGS_CONFLICT,
        re.compile(
            r"^AssertionError: (?:network for Text Encoder cannot be trained with caching"
            r"|when caching Text Encoder output, either"
            r"|fp8_base requires mixed precision"
            r"|bucket_reso_steps is \d+\. it must be divisible by"
            r"|v2 cannot be enabled in SDXL training)"
        ),
    ),
    # The traceback frame names the tokenizer loader: the exception itself is a bare TypeError when
    # offline (run 13) or a ConnectionError when the network is down (run 15).
    (ERR_TOKENIZER, re.compile(r"\bin (?:_load_tokenizer|get_tokenize_strategy)$|Can't load tokenizer")),
    (
        ERR_NETWORK,
        re.compile(
            r"^[\w.]*(?:ConnectionError|NameResolutionError|MaxRetryError|gaierror|ConnectTimeout"
            r"|ReadTimeout|OfflineModeIsEnabled|LocalEntryNotFoundError)\b"
            r"|We couldn't connect to"
        ),
    ),
)

# Every text an error rule matches contains one of these words (case matters), and nearly no other
# line does: one search over literals instead of 14 patterns per line (an alternation of the patterns
# themselves costs 10x more). A new rule must add its word here; test_progress checks each rule's samples.
_ERROR_HINTS: Final = re.compile(
    r"Error|error|Traceback|memory|Allocator|No |file|valid|found|voluptuous|mismatch|tokeniz|Timeout"
    r"|Offline|connect"
)

# --- line shapes ----------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# Any tqdm bar up to its closing bracket: `desc: 50%|█████     | 8/16 [...]` or the no-total `0it [...]`.
_ANY_BAR = re.compile(r"^[^\[\]|]*?(?:\d+%\|[^|]*\|\s*\d+/\d+|\d+it)\s*\[[^\]]*\]")

_BAR_BODY = (
    r"\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>[\d:]+)<(?P<eta>[\d:]+|\?),\s*(?P<rate>[\d.]+(?:e[+-]?\d+)?|\?)(?P<unit>it/s|s/it)"
    r"(?:,\s*(?P<postfix>[^\]]*))?\]"
)
# Only the bar with desc exactly `steps` is training; `validation steps:` and friends are not.
_STEPS_BAR = re.compile(r"^steps:\s+" + _BAR_BODY)
# kohya's caching loops draw tqdm bars without a description; so do the sampler and the dataset scan.
_UNNAMED_BAR = re.compile(r"^\s*" + _BAR_BODY)
_AVR_LOSS = re.compile(r"\bavr_loss=(?P<loss>[^,\]\s]+)")

# Rich's record: [timestamp or blank] LEVEL message file.py:NN, padded to the console width.
_RICH_HEAD = re.compile(
    r"^\s*(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+)?(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+"
    r"(?P<msg>.*?)\s+[\w.-]+\.py:\d+\s*$"
)
# Rich indents continuation lines to its message column (29 spaces at any width). Only consulted right
# after a record head, so traceback carets and argparse usage lines (also deeply indented) never get here.
_RICH_CONTINUATION = re.compile(r"^ {21,}\S")

_TOTAL_STEPS = re.compile(r"^total optimization steps\b[^:]*:\s*(?P<n>\d+)\s*$")
_EPOCH = re.compile(r"^epoch (?P<e>\d+)/(?P<n>\d+)$")
_CHECKPOINT = re.compile(r"^saving checkpoint:\s*(?P<path>.*)$")
_MODEL_SAVED = re.compile(r"^model saved\.$")
_SAMPLES = re.compile(r"^generating sample images at step\b")
# What kohya prints as it enters each phase before training (same words in SD 1.x and SDXL, plain with
# --console_log_simple or as a Rich record): train_util.load_target_model, the caching strategies, networks/lora.py.
_PREP_MESSAGES: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    (re.compile(r"^(?:loading model for process \d|load StableDiffusion checkpoint:|load Diffusers pretrained)"),
     PHASE_LOADING_MODEL),
    (re.compile(r"^caching latents(?: with|\.\.\.$)"), PHASE_CACHING_LATENTS),
    (re.compile(r"^caching Text Encoder outputs(?: with|\.\.\.$)"), PHASE_CACHING_TEXT),
    (re.compile(r"^(?:import network module:|create LoRA network\.)"), PHASE_CREATING_LORA),
)
# kohya logs `caching latents...` / `caching Text Encoder outputs...` right before the loop whose bar counts
# the phase; `checking cache validity...` comes before a quick bar of its own that must not count.
_CACHE_LOOP = re.compile(r"^caching (?:latents|Text Encoder outputs)\.\.\.$")
_CACHE_CHECK: Final = "checking cache validity"
_TRAILING_INT = re.compile(r"(\d+)\s*$")


def _strip_ansi(line: str) -> str:
    # Nested tqdm bars (sample images during training) end with a cursor-up escape.
    return _ANSI.sub("", line) if "\x1b" in line else line


def _clean(line: str) -> str:
    return _strip_ansi(line).rstrip()


def _bar_at_start(text: str) -> re.Match[str] | None:
    # `_ANY_BAR` needs `%|`, or `it` and a `[`: most log lines have neither and skip the regex.
    if "%|" in text or ("it" in text and "[" in text):
        return _ANY_BAR.match(text)
    return None


def _split_parts(line: str) -> list[tuple[str, bool]]:
    """`split_glued_line`, each part tagged with whether it is a tqdm bar (so nobody matches it again)."""
    parts: list[tuple[str, bool]] = []
    rest = _strip_ansi(line)
    while (bar := _bar_at_start(rest)) is not None:
        if not rest[bar.end() :].strip():
            parts.append((rest, True))
            return parts
        parts.append((rest[: bar.end()], True))
        rest = rest[bar.end() :]
    parts.append((rest, False))
    return parts


def split_glued_line(line: str) -> list[str]:
    """Split text that follows a tqdm bar on the same line into its own line.

    tqdm never ends a redraw with a newline, so the next write (a Rich record, a traceback, a stdout
    print in a merged stream) starts right after the bar's `]`. Trailing padding alone is not split off.
    """
    return [part for part, _ in _split_parts(line)]


def _rich_message(text: str) -> str | None:
    if ".py:" not in text:  # every Rich record ends with its source `file.py:NN`
        return None
    head = _RICH_HEAD.match(text)
    return head.group("msg") if head else None


def _is_rich_continuation(text: str) -> bool:
    return text.startswith(" " * 21) and bool(_RICH_CONTINUATION.match(text)) and _rich_message(text) is None


# --- stateless parsing ------------------------------------------------------------------------------


def _parse_clock(value: str) -> float | None:
    """tqdm's `MM:SS` or `H:MM:SS`; `?` while unknown."""
    if not value or value == "?":
        return None
    seconds = 0
    for part in value.split(":"):
        if not part.isdigit():
            return None
        seconds = seconds * 60 + int(part)
    return float(seconds)


def _parse_rate(value: str, unit: str) -> float | None:
    if value == "?":
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if unit == "it/s":
        return number
    # tqdm flips to s/it when a step takes over a second; callers always get steps per second.
    return 1.0 / number if number > 0 else None


def _parse_loss(postfix: str | None) -> float | None:
    found = _AVR_LOSS.search(postfix or "")
    if found is None:
        return None
    try:
        return float(found.group("loss"))  # float() reads `nan`, `inf` and `1.23e-5` as printed
    except ValueError:
        return None


def _parse_unnamed_bar(text: str, phase: str) -> PrepProgress | None:
    bar = _UNNAMED_BAR.match(text)
    if bar is None:
        return None
    return PrepProgress(phase, int(bar.group("n")), int(bar.group("total")), _parse_clock(bar.group("eta")))


def _parse_steps_bar(text: str) -> StepProgress | None:
    bar = _STEPS_BAR.match(text)
    if bar is None:
        return None
    return StepProgress(
        step=int(bar.group("n")),
        total=int(bar.group("total")),
        rate=_parse_rate(bar.group("rate"), bar.group("unit")),
        elapsed_s=_parse_clock(bar.group("elapsed")),
        eta_s=_parse_clock(bar.group("eta")),
        loss=_parse_loss(bar.group("postfix")),
    )


def _classify_error(message: str) -> ErrorLine | None:
    if _ERROR_HINTS.search(message) is None:
        return None
    for kind, pattern in _ERROR_RULES:
        if pattern.search(message):
            return ErrorLine(kind, message)
    return None


def _parse_message(message: str) -> ProgressEvent | None:
    """A log message or print with any Rich decoration already removed."""
    message = message.strip()
    if message.startswith(_MESSAGE_STARTS):
        return _parse_known_message(message) or _classify_error(message)
    return _classify_error(message)


# Every message `_parse_known_message` recognises starts with one of these.
_MESSAGE_STARTS: Final = (
    "total optimization steps", "epoch ", "saving checkpoint:", "model saved.", "generating ",
    "loading model for process", "load StableDiffusion", "load Diffusers", "caching latents with", "caching latents...",
    "caching Text Encoder outputs", "import network module:", "create LoRA network.", _CACHE_CHECK,
)


def _parse_known_message(message: str) -> ProgressEvent | None:
    if total := _TOTAL_STEPS.match(message):
        return TotalSteps(int(total.group("n")))
    if epoch := _EPOCH.match(message):
        return EpochStarted(int(epoch.group("e")), int(epoch.group("n")))
    if checkpoint := _CHECKPOINT.match(message):
        return CheckpointSaved(checkpoint.group("path").strip())
    if _MODEL_SAVED.match(message):
        return ModelSaved()
    if _SAMPLES.match(message):
        # At 80 columns the step number sits on the record's continuation line, absent here.
        step = _TRAILING_INT.search(message)
        return SampleImagesStarted(int(step.group(1)) if step else None)
    for pattern, phase in _PREP_MESSAGES:
        if pattern.match(message):
            return PrepStarted(phase)
    return None


def parse_line(line: str) -> ProgressEvent | None:
    """Parse one line (no `\\r`/`\\n`) from either stream.

    Stateless: a Rich record wrapped over several lines is seen one line at a time, so a wrapped
    `generating sample images at step` gives `SampleImagesStarted(None)` and a wrapped checkpoint path
    comes out truncated; `ProgressTracker` joins those. Text glued after a tqdm bar is ignored here
    (the bar wins); `ProgressTracker` splits it off with `split_glued_line` first.
    """
    text = _clean(line)
    if not text.strip():
        return None
    return _parse_part(text, _bar_at_start(text) is not None)[0]


def _parse_part(text: str, is_bar: bool) -> tuple[ProgressEvent | None, str | None]:
    """(event, Rich message or None) of one cleaned part; a bar is never a Rich record."""
    if is_bar:
        return (_parse_steps_bar(text) if text.startswith("steps:") else None), None
    rich = _rich_message(text)
    return _parse_message(rich if rich is not None else text), rich


# --- incremental line splitting ----------------------------------------------------------------------

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BAR_MARK: Final = "%|"  # a part holding a tqdm bar (even a cut one) is progress, not a log line


class LineSplitter:
    """Cut a stream of text chunks into lines at `\\r`, `\\n` and `\\r\\n`.

    One splitter per pipe: a partial line is kept until its end arrives. Blank and whitespace-only lines
    are dropped (Rich pads blank rows to the console width; `\\r\\n` split across two chunks yields one).
    """

    # A stream that never sends a line break (binary garbage, a runaway print) must not grow without
    # bound; past this size the partial line is handed out as it is.
    MAX_LINE_CHARS: Final = 64 * 1024

    def __init__(self) -> None:
        self._tail = ""

    @property
    def pending(self) -> str:
        """The unterminated tail. tqdm leaves its latest bar here until the next redraw starts, so a
        caller wanting the freshest progress can `parse_line(splitter.pending)` without consuming it."""
        return self._tail

    def feed(self, text: str) -> list[str]:
        pieces = _LINE_BREAK.split(self._tail + text)
        self._tail = pieces.pop()
        if len(self._tail) > self.MAX_LINE_CHARS:
            pieces.append(self._tail)
            self._tail = ""
        return [piece for piece in pieces if piece.strip()]

    def flush(self) -> list[str]:
        tail, self._tail = self._tail, ""
        return [tail] if tail.strip() else []


def prep_phase(phase: str, event: ProgressEvent) -> str:
    """The job's phase after `event`, for the phases before training (runner.preview_phase does the previews).

    Each phase starts with the line kohya prints as it enters it; training starts with the step total printed
    just before the loop, its first epoch or its first bar, whichever comes first.
    """
    if isinstance(event, PrepStarted):
        return event.phase
    if phase in PREP_PHASES and isinstance(event, (TotalSteps, EpochStarted, StepProgress)):
        return PHASE_TRAINING
    return phase


def _could_be_exception(event: ProgressEvent | None, rich: str | None) -> bool:
    # The other pipe keeps writing while a traceback arrives: its bars, prints and log records are not it.
    return (event is None or isinstance(event, ErrorLine)) and rich is None


# --- stateful tracking -------------------------------------------------------------------------------


@dataclass
class _PendingRecord:
    """A Rich record whose event needs its continuation lines (wrapped path or sample step)."""

    head: str
    event: CheckpointSaved | SampleImagesStarted
    continuations: list[str]

    def event_so_far(self) -> CheckpointSaved | SampleImagesStarted:
        if isinstance(self.event, CheckpointSaved):
            # Rich folds a long path without inserting spaces, so the pieces join as they are.
            return CheckpointSaved(self.event.path + "".join(self.continuations))
        joined = _parse_message(" ".join([self.head, *self.continuations]))
        return joined if isinstance(joined, SampleImagesStarted) else self.event


class ProgressTracker:
    """Feed it every line from both pipes (in arrival order); it returns the events each line yields
    and remembers what a job needs at the end: total steps, epoch, checkpoints, `model saved.`, errors."""

    def __init__(self, *, max_errors: int = 32) -> None:
        self._max_errors = max_errors
        self._total_steps: int | None = None
        self._epoch: int | None = None
        self._epochs: int | None = None
        self._last_progress: StepProgress | None = None
        self._model_saved = False
        self._checkpoints: list[str] = []
        self._errors: list[ErrorLine] = []
        self._nan_reported = False
        self._in_traceback = False
        self._pending: _PendingRecord | None = None
        self._prep_phase: str | None = None
        self._bar_phase: str | None = None  # the caching phase an unnamed bar counts for, right now
        self._last_prep: PrepProgress | None = None

    # -- state ------------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int | None:
        """Latest known total: the stdout summary, then the bar's own total (which differs on resume)."""
        return self._total_steps

    @property
    def step(self) -> int:
        return self._last_progress.step if self._last_progress else 0

    @property
    def epoch(self) -> int | None:
        return self._epoch

    @property
    def epochs(self) -> int | None:
        return self._epochs

    @property
    def last_progress(self) -> StepProgress | None:
        return self._last_progress

    @property
    def prep_phase(self) -> str | None:
        """The latest phase kohya announced before training (one of PREP_PHASES), None before the first."""
        return self._prep_phase

    @property
    def model_saved(self) -> bool:
        return self._model_saved

    @property
    def checkpoints(self) -> tuple[str, ...]:
        """Paths from `saving checkpoint:`, in order; the last one is the final LoRA once training ends."""
        return tuple(self._checkpoints)

    @property
    def errors(self) -> tuple[ErrorLine, ...]:
        """The first `max_errors` distinct error lines, in order of appearance."""
        return tuple(self._errors)

    # -- input ------------------------------------------------------------------------------------

    def feed_line(self, line: str) -> list[ProgressEvent]:
        events: list[ProgressEvent] = []
        for part, is_bar in _split_parts(line):
            events.extend(self._feed_part(part.rstrip(), is_bar))
        return events

    def feed_lines(self, lines: list[str], log: list[str]) -> list[ProgressEvent]:
        """`feed_line` for each line, appending to `log` every part worth showing as a log line: all
        but tqdm bars and blank parts, without ANSI escapes or trailing padding."""
        events: list[ProgressEvent] = []
        for line in lines:
            if self._plain(line):
                text = line.rstrip()
                if text.strip():
                    log.append(text)
                continue
            for part, is_bar in _split_parts(line):
                text = part.rstrip()
                if not is_bar and text.strip() and _BAR_MARK not in text:
                    log.append(text)
                events.extend(self._feed_part(text, is_bar))
        return events

    def peek_bar(self, text: str) -> list[ProgressEvent]:
        """The training bar tqdm is still drawing (a pipe's unterminated tail), once it is complete.

        tqdm writes `\\r` + bar and nothing after it until the next redraw, so without this the newest
        state would wait for the next step. Only a whole bar (up to its closing `]`) counts; when the
        same redraw later arrives as a line it repeats this event and is dropped as a repeat.
        """
        text = _strip_ansi(text)
        if text.startswith("steps:"):
            event = _parse_steps_bar(text)
            return self._apply_progress(event) if event is not None else []
        if self._bar_phase is not None:
            prep = _parse_unnamed_bar(text, self._bar_phase)
            return self._apply(prep) if prep is not None else []
        return []

    def finish(self) -> list[ProgressEvent]:
        """Call once both pipes are closed: emits a record still waiting for continuation lines."""
        return self._flush_pending()

    # -- internals --------------------------------------------------------------------------------

    def _plain(self, line: str) -> bool:
        """True for the bulk of a chatty trainer's output: a line that can yield no event and change no
        state (no escape, bar, Rich record, known message or error word; nothing half-read)."""
        if self._pending is not None or self._in_traceback:
            return False
        if "\x1b" in line or "%|" in line or ".py:" in line or ("it" in line and "[" in line):
            return False
        return not line.lstrip().startswith(_MESSAGE_STARTS) and _ERROR_HINTS.search(line) is None

    def _feed_part(self, text: str, is_bar: bool) -> list[ProgressEvent]:
        """One cleaned part (no ANSI, no trailing blanks) of a line."""
        if not text.strip():
            return []
        events: list[ProgressEvent] = []
        if self._pending is not None:
            if not is_bar and _is_rich_continuation(text):
                return self._continue_pending(text.strip())
            events.extend(self._flush_pending())

        event, rich = _parse_part(text, is_bar)
        if is_bar:
            if event is None and self._bar_phase is not None:
                event = _parse_unnamed_bar(text, self._bar_phase)
        else:
            self._follow_cache_loop((rich if rich is not None else text).strip(), event)
        if rich is not None and self._starts_pending(rich, event):
            return events
        events.extend(self._exception_line(text, event, rich))
        if event is not None:
            events.extend(self._apply(event))
        return events

    def _follow_cache_loop(self, message: str, event: ProgressEvent | None) -> None:
        """Which phase the next unnamed bar counts for: only the caching loop's own bar does, not the quick
        `checking cache validity...` bar before it, the dataset scan's bars or the sampler's."""
        if isinstance(event, PrepStarted):
            self._bar_phase = event.phase if event.phase in _CACHING_PHASES and _CACHE_LOOP.match(message) else None
        elif message.startswith(_CACHE_CHECK):
            self._bar_phase = None

    def _starts_pending(self, head: str, event: ProgressEvent | None) -> bool:
        # A Rich record may continue on the next lines; hold the events that need its full text.
        if isinstance(event, CheckpointSaved) or (
            isinstance(event, SampleImagesStarted) and event.step is None
        ):
            self._pending = _PendingRecord(head=head.strip(), event=event, continuations=[])
            return True
        return False

    def _continue_pending(self, piece: str) -> list[ProgressEvent]:
        assert self._pending is not None
        self._pending.continuations.append(piece)
        event = self._pending.event_so_far()
        # The sample step is complete as soon as its number shows; no need to wait for the next record.
        if isinstance(event, SampleImagesStarted) and event.step is not None:
            self._pending = None
            return self._apply(event)
        return []

    def _flush_pending(self) -> list[ProgressEvent]:
        if self._pending is None:
            return []
        event, self._pending = self._pending.event_so_far(), None
        return self._apply(event)

    def _exception_line(self, text: str, event: ProgressEvent | None, rich: str | None) -> list[ProgressEvent]:
        """Python ends a traceback with the first unindented line after its header: the exception."""
        if isinstance(event, ErrorLine) and event.kind == ERR_TRACEBACK:
            self._in_traceback = True
            return []
        if not self._in_traceback or text[:1].isspace() or not _could_be_exception(event, rich):
            return []
        self._in_traceback = False
        return self._apply(ErrorLine(ERR_EXCEPTION, text.strip()))

    def _apply(self, event: ProgressEvent) -> list[ProgressEvent]:
        if isinstance(event, StepProgress):
            return self._apply_progress(event)
        if isinstance(event, PrepStarted):
            if event.phase == self._prep_phase:
                return []  # several lines announce the same phase (`loading model ...`, `load ... checkpoint`)
            self._prep_phase = event.phase
        elif isinstance(event, PrepProgress):
            if event == self._last_prep:
                return []  # tqdm draws its last state twice, and a peeked bar arrives again as a line
            self._last_prep = event
        elif isinstance(event, TotalSteps):
            self._total_steps = event.total
            self._bar_phase = None
        elif isinstance(event, EpochStarted):
            self._epoch, self._epochs = event.epoch, event.epochs
            self._bar_phase = None
        elif isinstance(event, CheckpointSaved):
            if not event.path:
                return []
            self._checkpoints.append(event.path)
        elif isinstance(event, ModelSaved):
            self._model_saved = True
        elif isinstance(event, ErrorLine):
            return self._record_error(event)
        return [event]

    def _apply_progress(self, event: StepProgress) -> list[ProgressEvent]:
        # Each step is drawn twice (before and after the new avr_loss) and the second draw often
        # repeats the first exactly; pass on changes only.
        self._bar_phase = None  # no caching loop runs once training has started
        if event == self._last_progress:
            return []
        self._last_progress = event
        self._total_steps = event.total
        events: list[ProgressEvent] = [event]
        if event.loss is not None and math.isnan(event.loss) and not self._nan_reported:
            self._nan_reported = True
            events.extend(self._record_error(ErrorLine(ERR_NAN_LOSS, f"avr_loss=nan at step {event.step}")))
        return events

    def _record_error(self, error: ErrorLine) -> list[ProgressEvent]:
        if error not in self._errors and len(self._errors) < self._max_errors:
            self._errors.append(error)
        return [error]


# --- both pipes -----------------------------------------------------------------------------------


@dataclass
class Parsed:
    """What one chunk of trainer output amounts to."""

    log_lines: list[str]
    events: list[ProgressEvent]


class OutputParser:
    """The trainer's pipes in (chunks of decoded text, in arrival order), log lines and events out.

    One LineSplitter per pipe and one ProgressTracker for both. After each chunk the pipe's
    unterminated tail is looked at too: that is where tqdm leaves the bar it is drawing right now.
    Pure and single-threaded: the daemon runs it in a worker thread, one chunk at a time.
    """

    def __init__(self) -> None:
        self.tracker = ProgressTracker()
        self._splitters: dict[str, LineSplitter] = {}
        self._peeked: dict[str, str] = {}

    def feed(self, stream: str, text: str) -> Parsed:
        splitter = self._splitters.setdefault(stream, LineSplitter())
        log: list[str] = []
        events = self.tracker.feed_lines(splitter.feed(text), log)
        tail = splitter.pending
        if _BAR_MARK in tail and tail != self._peeked.get(stream):
            self._peeked[stream] = tail
            events.extend(self.tracker.peek_bar(tail))
        return Parsed(log, events)

    def finish(self) -> Parsed:
        """Once every pipe is closed: the unterminated tails, and a record still waiting for its end."""
        log: list[str] = []
        events: list[ProgressEvent] = []
        for splitter in self._splitters.values():
            events.extend(self.tracker.feed_lines(splitter.flush(), log))
        events.extend(self.tracker.finish())
        return Parsed(log, events)
