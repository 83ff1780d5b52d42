"""kohya's WD14 tagger (`finetune/tag_images_by_wd14_tagger.py` of sd-scripts): its command, readiness, output.

Facts behind every choice here: tests/fixtures/wd14_tagger/FACTS.md (sd-scripts 48d368fa). In short: an absolute
`--model_dir` owned by the daemon (the default is relative to the cwd); `--onnx` (the Keras path needs TensorFlow,
which no sd-scripts venv has); `--character_threshold 1.01` (any character tag passing its threshold crashes the
script at that commit, and the trigger word absorbs the character anyway); `--force_download` only when the model
folder exists without its files (the script downloads only when the folder is missing, so a failed first download
poisons it). The running of it is in tagger_run.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from daemon.config import Config
from daemon.pipeline.env_check import kohya_python
from daemon.pipeline.process import NO_WINDOW

SCRIPT = Path("finetune") / "tag_images_by_wd14_tagger.py"
REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"  # the script's own default (DEFAULT_WD14_TAGGER_REPO)
MODEL_FILES = ("model.onnx", "selected_tags.csv")  # what --onnx reads from the model folder (FACTS.md 3.3)
MODEL_DIR_NAME = "wd14_tagger_model"
CAPTION_EXT = ".txt"
SEPARATOR = ", "
DEFAULT_THRESHOLD = 0.35
MIN_THRESHOLD, MAX_THRESHOLD = 0.1, 0.9
# Scores are probabilities: above 1 no character tag passes, which avoids the crash of FACTS.md 2.6.
CHARACTER_THRESHOLD = 1.01
# One picture a batch: the tqdm bar then counts pictures, and 25 pictures are quick on any device.
BATCH_SIZE = 1
PROBE_TIMEOUT_S = 60
# A missing onnxruntime is asked again after this long: the user may install it while the daemon runs.
NEGATIVE_PROBE_TTL_S = 30.0

_ONNX_PROBE = "import onnx, onnxruntime; print(onnxruntime.__version__)"


@dataclass(frozen=True)
class Problem:
    title: str
    detail: str
    fix: str


@dataclass(frozen=True)
class TaggerSetup:
    """Where the tagger and its model are for a given config."""

    python: str | None
    script: Path | None
    model_dir: Path
    repo_id: str = REPO_ID

    @property
    def model_location(self) -> Path:
        return model_location(self.model_dir, self.repo_id)


def tagger_setup(config: Config) -> TaggerSetup:
    workspace = config.kohya.workspace
    return TaggerSetup(python=kohya_python(config), script=workspace / SCRIPT if workspace else None,
                       model_dir=(config.data_dir / MODEL_DIR_NAME).absolute())


def model_location(model_dir: Path, repo_id: str) -> Path:
    return model_dir / repo_id.replace("/", "_")  # as the script does (L120)


def model_cached(location: Path) -> bool:
    """Every file the --onnx path reads is there and not empty; the folder alone proves nothing (FACTS.md 3.4)."""
    for name in MODEL_FILES:
        try:
            if (location / name).stat().st_size == 0:
                return False
        except OSError:
            return False
    return True


def build_argv(setup: TaggerSetup, pictures: Path, *, threshold: float, batch_size: int = BATCH_SIZE) -> list[str]:
    """The tagger's command line for the pictures in `pictures` (an absolute folder); caption files
    `<stem>.txt` are written next to them."""
    if setup.python is None or setup.script is None:
        raise ValueError("the tagger is not set up (no kohya python or sd-scripts folder)")
    location = setup.model_location
    argv = [
        setup.python, str(setup.script), str(pictures),
        "--onnx",
        "--repo_id", setup.repo_id,
        "--model_dir", str(setup.model_dir),
        "--batch_size", str(batch_size),
        "--thresh", f"{threshold:g}",
        "--general_threshold", f"{threshold:g}",
        "--character_threshold", f"{CHARACTER_THRESHOLD:g}",
        "--caption_extension", CAPTION_EXT,
        "--caption_separator", SEPARATOR,
        "--remove_underscore",
    ]
    if location.exists() and not model_cached(location):
        argv.append("--force_download")  # a half-done earlier download: the script would not fetch it again
    return argv


def tagger_env(base: Mapping[str, str]) -> dict[str, str]:
    return {
        **base,
        # UTF-8 output on Windows too (the Japanese help text kills a cp1252 stdout), one rich record a line.
        "PYTHONUTF8": "1", "PYTHONIOENCODING": "utf-8", "COLUMNS": "250",
        # huggingface_hub's download bars would be mistaken for the tagging bar.
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


# ------------------------------------------------------------------------------------------- readiness
class OnnxProbe:
    """Whether a python can import onnx and onnxruntime, asked in a subprocess and remembered (a yes for good,
    a no for NEGATIVE_PROBE_TTL_S)."""

    def __init__(self) -> None:
        self._answers: dict[tuple[str, str], tuple[str | None, float]] = {}
        # One probe at a time: callers that arrive while one runs wait for its answer instead of starting a
        # python each (GET /tagger, a tagging run and /config/test can ask at once).
        self._lock = threading.Lock()

    def problem(self, python: str, *, refresh: bool = False) -> str | None:
        """None when both import, else what failed (a sentence)."""
        key = (python, os.environ.get("PYTHONPATH", ""))
        asked = time.monotonic()
        with self._lock:
            cached = self._answers.get(key)
            fresh = cached is not None and (cached[0] is None or time.monotonic() - cached[1] < NEGATIVE_PROBE_TTL_S)
            # a refresh is satisfied by a probe that started after it was asked for
            if cached is not None and fresh and (not refresh or cached[1] >= asked):
                return cached[0]
            started = time.monotonic()
            answer = _probe_onnx(python)
            self._answers[key] = (answer, started)
            return answer


def _probe_onnx(python: str) -> str | None:
    try:
        done = subprocess.run([python, "-c", _ONNX_PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                              env=tagger_env(os.environ), creationflags=NO_WINDOW)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} could not be run ({exc})"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"the import failed (exit {done.returncode})"


@dataclass(frozen=True)
class Readiness:
    available: bool
    model_cached: bool
    repo_id: str
    model_dir: str
    problems: list[Problem] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @property
    def summary(self) -> str:
        if not self.available:
            return "; ".join(p.detail for p in self.problems)
        if self.model_cached:
            return f"ready; the model {self.repo_id} is in {self.model_dir}"
        return (f"ready; the model {self.repo_id} is not downloaded yet: the first tagging downloads it "
                "(a few hundred MB, needs internet once)")


def readiness(setup: TaggerSetup, probe: OnnxProbe, *, refresh: bool = False) -> Readiness:
    """Can the tagger run now, and is its model already on this computer? Blocking (a subprocess): run it in a
    thread."""
    problems: list[Problem] = []
    if setup.python is None:
        problems.append(Problem("No kohya python", "the sd-scripts venv's python was not found",
                                "Set kohya.python (or kohya.accelerate_bin) in the daemon config."))
    if setup.script is None:
        problems.append(Problem("No sd-scripts folder", "kohya.workspace is not set",
                                "Set kohya.workspace to the sd-scripts folder."))
    elif not setup.script.is_file():
        problems.append(Problem("Tagger script missing", f"{setup.script} does not exist",
                                "Point kohya.workspace at an sd-scripts checkout that has finetune/."))
    if setup.python is not None and not problems:
        why = probe.problem(setup.python, refresh=refresh)
        if why is not None:
            problems.append(Problem("onnxruntime missing", f"the sd-scripts venv cannot import onnx and onnxruntime "
                                    f"({why})", f"Run: {setup.python} -m pip install onnx onnxruntime "
                                    "(onnxruntime-gpu for an NVIDIA GPU), then try again."))
    return Readiness(available=not problems, model_cached=model_cached(setup.model_location), repo_id=setup.repo_id,
                     model_dir=str(setup.model_dir), problems=problems)


# -------------------------------------------------------------------------------------------- output
# tqdm's counter: "  50%|█████     | 1/2 [00:01<00:01, 1.00it/s]"; the bar counts batches.
_BAR = re.compile(r"\|\s*(\d+)/(\d+) \[")
_DOWNLOADING = "downloading wd14 tagger model"
_FOUND = re.compile(r"found \d+ images\.")


@dataclass
class TaggerProgress:
    """What the tagger's stderr said so far: its phase and batches done."""

    phase: str = "starting"  # starting -> downloading (first use) -> tagging
    batches_done: int = 0
    batches_total: int = 0
    _partial: str = ""

    def feed(self, text: str) -> bool:
        """Take a chunk of stderr; True when the phase or the count changed."""
        before = (self.phase, self.batches_done)
        pieces = re.split(r"[\r\n]", self._partial + text)
        self._partial = pieces.pop()
        for piece in pieces:
            self._line(piece)
        if _BAR.search(self._partial):
            self._line(self._partial)
        return (self.phase, self.batches_done) != before

    def _line(self, line: str) -> None:
        if _DOWNLOADING in line:
            self.phase = "downloading"
        elif _FOUND.search(line):
            self.phase = "tagging"
        if match := _BAR.search(line):
            self.phase = "tagging"
            self.batches_done, self.batches_total = int(match.group(1)), int(match.group(2))

    def pictures_done(self, total: int, batch_size: int = BATCH_SIZE) -> int:
        return min(total, self.batches_done * batch_size)


def read_tags(folder: Path, pictures: Sequence[Path]) -> list[list[str]]:
    """Each picture's tags from its `<stem>.txt`, in order; a picture without one has none."""
    result = []
    for picture in pictures:
        try:
            text = picture.with_suffix(CAPTION_EXT).read_text(encoding="utf-8")
        except FileNotFoundError:
            result.append([])
            continue
        seen: list[str] = []
        for tag in (t.strip() for t in text.split(SEPARATOR.strip())):
            if tag and tag not in seen:
                seen.append(tag)
        result.append(seen)
    return result


# Tags that say how many people, how the picture is framed, or what is behind: they describe the picture, not the
# character, so they are never suggested for dropping however often they occur.
GENERIC_TAGS = frozenset({
    "1girl", "2girls", "3girls", "multiple girls", "1boy", "2boys", "multiple boys", "1other", "solo", "solo focus",
    "male focus", "no humans", "looking at viewer", "upper body", "full body", "cowboy shot", "portrait",
    "close-up", "simple background", "white background", "standing", "sitting", "outdoors", "indoors",
})
# "Most pictures": more than this share of them.
SUGGEST_SHARE = 0.5
SUGGEST_RULE = ("Unticked: tags on more than half of the pictures (likely the character's fixed looks, which the "
                "trigger word should learn), except people-count, framing and background tags.")


@dataclass(frozen=True)
class TagCount:
    tag: str
    count: int
    suggest_drop: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def is_generic(tag: str) -> bool:
    norm = tag.replace("_", " ").lower()
    return norm in GENERIC_TAGS or norm.endswith(" background")


def summarize(per_picture: Sequence[Sequence[str]]) -> list[TagCount]:
    """Every tag with the number of pictures it is on, most frequent first (ties: first seen first)."""
    counts: dict[str, int] = {}
    for tags in per_picture:
        for tag in dict.fromkeys(tags):
            counts[tag] = counts.get(tag, 0) + 1
    pictures = len(per_picture)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return [TagCount(tag, n, suggest_drop=pictures >= 2 and n > SUGGEST_SHARE * pictures and not is_generic(tag))
            for tag, n in ranked]


# The last line of stderr names the failure (every failure is an uncaught exception: FACTS.md 2.5).
_FAILURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("Force download failed", "force_download=True' when offline", "ConnectionError", "NameResolutionError"),
     "The tagger model is not downloaded yet and huggingface.co cannot be reached: connect this computer to the "
     "internet once, then try again."),
    (("onnx model not found",),
     "The tagger model download is incomplete; try again (the daemon downloads it again)."),
    (("No module named 'onnx'", "No module named 'onnxruntime'"),
     "The sd-scripts venv lacks onnx/onnxruntime: install them there (pip install onnx onnxruntime), then try "
     "again."),
    (("UnboundLocalError", "character_tags"),
     "kohya's tagger failed on a character tag (a known bug of sd-scripts at this version)."),
    (("UnidentifiedImageError", "cannot identify image file"),
     "The tagger could not read one of the pictures."),
)


def failure_sentence(code: int, stderr_tail: Sequence[str]) -> str:
    lines = [line.strip() for line in stderr_tail if line.strip()]
    last = lines[-1] if lines else ""
    for needles, sentence in _FAILURES:
        if any(n in last for n in needles):
            return sentence
    detail = f": {last[:300]}" if last else ""
    return f"kohya's tagger stopped with exit code {code}{detail}"
