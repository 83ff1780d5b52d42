"""Is this machine ready to train? Each check says what it found and, when it fails, how to fix it.

The GPU is probed in a subprocess of the kohya python: torch is not a daemon dependency, and the
daemon must never import it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from daemon.config import Config
from daemon.pipeline import clip_tokenizer
from daemon.pipeline.base_models import list_models
from daemon.pipeline.clip_tokenizer import TOKENIZER_FOLDER
from daemon.pipeline.model_arch import ARCH_LABELS, TRAINABLE_ARCHS, detect_arch
from daemon.pipeline.process import NO_WINDOW

MIN_FREE_BYTES = 2 * 1024**3
GPU_PROBE_TIMEOUT_S = 90

_GPU_PROBE = """
import json
try:
    import torch
except Exception as exc:
    print(json.dumps({"torch": None, "error": f"{type(exc).__name__}: {exc}"}))
    raise SystemExit(0)
info = {"torch": torch.__version__, "cuda": bool(torch.cuda.is_available())}
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, vram_gb=round(p.total_memory / 1024**3, 1))
    # Native bf16 is Ampere (compute capability 8) and newer; torch's is_bf16_supported() also says yes
    # for the much slower emulation on older cards.
    info["bf16"] = p.major >= 8
print(json.dumps(info))
"""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class GpuInfo:
    cuda: bool
    name: str | None = None
    vram_gb: float | None = None
    torch: str | None = None
    error: str | None = None
    probed_at: float = 0.0
    ran: bool = True  # False when the kohya python could not be started at all
    bf16: bool | None = None  # the GPU computes in bf16 natively; None when unknown or no GPU


def kohya_python(config: Config) -> str | None:
    """The interpreter of the kohya venv: configured, or the `python` beside the accelerate launcher."""
    if config.kohya.python:
        return str(config.kohya.python)
    launcher = shutil.which(config.kohya.accelerate_bin)
    if not launcher:
        return None
    folder = Path(launcher).resolve().parent
    for name in ("python.exe", "python") if sys.platform == "win32" else ("python3", "python"):
        if (folder / name).is_file():
            return str(folder / name)
    return None


def probe_gpu(python: str | None) -> GpuInfo:
    if not python:
        return GpuInfo(cuda=False, error="no kohya python found", probed_at=time.time(), ran=False)
    try:
        done = subprocess.run(
            [python, "-c", _GPU_PROBE],
            capture_output=True,
            text=True,
            timeout=GPU_PROBE_TIMEOUT_S,
            env={**os.environ, "PYTHONIOENCODING": "utf-8"},
            creationflags=NO_WINDOW,
        )
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return GpuInfo(cuda=False, error=f"the GPU probe failed: {exc}", probed_at=time.time(), ran=False)
    return GpuInfo(
        cuda=bool(info.get("cuda")),
        name=info.get("name"),
        vram_gb=info.get("vram_gb"),
        torch=info.get("torch"),
        error=info.get("error"),
        probed_at=time.time(),
        bf16=info["bf16"] if isinstance(info.get("bf16"), bool) else None,
    )


def check_script(config: Config) -> Check:
    script = config.kohya.script_path
    fix = "Set kohya.script_path in the daemon config to sd-scripts' train_network.py (run install_plugin.py --kohya)."
    if script is None:
        return Check("kohya_script", False, "kohya.script_path is not set", fix)
    if not script.is_file():
        return Check("kohya_script", False, f"{script} does not exist", fix)
    return Check("kohya_script", True, str(script))


def check_workspace(config: Config) -> Check:
    ws = config.kohya.workspace
    fix = "Set kohya.workspace to the sd-scripts folder (the one holding train_network.py and networks/)."
    if ws is None:
        return Check("kohya_workspace", False, "kohya.workspace is not set", fix)
    if not ws.is_dir():
        return Check("kohya_workspace", False, f"{ws} is not a folder", fix)
    return Check("kohya_workspace", True, str(ws))


def check_launcher(config: Config, gpu: GpuInfo) -> Check:
    """The launcher exists, and the kohya python beside it really runs (the GPU probe ran in it)."""
    if config.kohya.python:
        py = config.kohya.python
        if not py.is_file():
            return Check("launcher", False, f"kohya.python {py} does not exist",
                         "Point kohya.python at the python of the sd-scripts venv.")
        if not gpu.ran:
            return Check("launcher", False, f"kohya.python {py} could not be run ({gpu.error})",
                         "Point kohya.python at a working python of the sd-scripts venv.")
        return Check("launcher", True, f"{py} (runs the script directly)")
    found = shutil.which(config.kohya.accelerate_bin)
    if not found:
        return Check("launcher", False, f"'{config.kohya.accelerate_bin}' was not found",
                     "Set kohya.accelerate_bin to the accelerate of the sd-scripts venv, or kohya.python.")
    if not gpu.ran:
        return Check("launcher", False, f"{found} was found, but the python of its venv could not be run ({gpu.error})",
                     "Set kohya.python to the python of the sd-scripts venv.")
    return Check("launcher", True, found)


def check_base_model(path: Path | None, models_dir: Path | None = None) -> Check:
    fix = ("Set base_model in the daemon config, or put an SD 1.x or SDXL model into Easy Diffusion's "
           "models/stable-diffusion.")
    if path is None:
        archs = [a for a in map(detect_arch, list_models(models_dir).values()) if a in TRAINABLE_ARCHS]
        if archs:
            # The ED tab always sends the model selected in ED; a default is only for other clients.
            counts = ", ".join(f"{archs.count(a)} {ARCH_LABELS[a]}" for a in TRAINABLE_ARCHS if a in archs)
            return Check("base_model", True, f"no default; trainable models in {models_dir}: {counts}")
        return Check("base_model", False, "no default base model is configured and none was found in ED's folder", fix)
    if not path.exists():
        return Check("base_model", False, f"{path} does not exist", fix)
    arch = detect_arch(path)
    label = ARCH_LABELS[arch]
    if arch not in TRAINABLE_ARCHS and arch != "unknown":
        return Check("base_model", False, f"{path.name} is {label}; only SD 1.x and SDXL models can be trained",
                     "Choose an SD 1.x or SDXL checkpoint (e.g. sd-v1-5, sd_xl_base_1.0) as the base model.")
    note = " (architecture could not be read; assuming SD 1.x)" if arch == "unknown" else ""
    return Check("base_model", True, f"{path} — {label}{note}")


def check_lora_dir(lora_dir: Path) -> Check:
    fix = "Set ed_lora_dir to Easy Diffusion's models/lora folder and make sure you may write there."
    try:
        lora_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=lora_dir, prefix=".write-test-", suffix=".partial"):
            pass
    except OSError as exc:
        return Check("lora_dir", False, f"cannot write into {lora_dir}: {exc.strerror or exc}", fix)
    return Check("lora_dir", True, str(lora_dir))


def check_disk(data_dir: Path) -> Check:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(data_dir).free
    except OSError as exc:
        return Check("disk", False, f"cannot use {data_dir}: {exc}", "Set data_dir to a writable folder.")
    gb = free / 1024**3
    if free < MIN_FREE_BYTES:
        return Check("disk", False, f"only {gb:.1f} GB free in {data_dir}", "Free at least 2 GB on that disk.")
    return Check("disk", True, f"{gb:.1f} GB free in {data_dir}")


def check_tokenizer(config: Config, *, arch: str = "sd1", environ: Mapping[str, str] | None = None,
                    reach: clip_tokenizer.Reach | None = None) -> Check:
    """Will kohya load the tokenizers of this family? The cache dir, else the HF cache, else can it download them.

    SD 1.x needs CLIP-L's; SDXL needs CLIP-L's and OpenCLIP bigG's. `environ` is the trainer's environment (the
    daemon passes its own on); `reach` opens the test connection (tests pass their own, so no test touches the
    network).
    """
    env = os.environ if environ is None else environ
    ids = clip_tokenizer.TOKENIZERS_BY_ARCH.get(arch, clip_tokenizer.TOKENIZERS_BY_ARCH["sd1"])
    name = "tokenizer" if len(ids) == 1 else f"tokenizer_{arch}"
    cache = config.kohya.tokenizer_cache_dir
    if cache is not None:
        return _cache_dir_check(name, cache, ids, env)
    snapshots = {tid: clip_tokenizer.cached_snapshot(env, tid) for tid in ids}
    absent = [tid for tid, snap in snapshots.items() if snap is None]
    if not absent:
        where = ", ".join(str(s) for s in snapshots.values())
        return Check(name, True, f"kohya.tokenizer_cache_dir is not set; kohya loads {_what(ids, arch)} "
                     f"from the Hugging Face cache ({where})")
    what = _what(absent, arch)
    hub_cache = clip_tokenizer.hub_cache_dir(env)
    files = ", ".join(clip_tokenizer.TOKENIZER_FILES)
    fix = (f"Copy the tokenizer files ({files}) into DIR/{TOKENIZER_FOLDER} and set kohya.tokenizer_cache_dir "
           "to DIR (install_plugin.py --tokenizer-cache DIR; see the README, 'offline'), or connect this computer "
           "to the internet.")
    if len(ids) > 1:
        fix = (f"Copy CLIP-L's tokenizer files ({files}) into DIR/{TOKENIZER_FOLDER} and set "
               "kohya.tokenizer_cache_dir to DIR with install_plugin.py --tokenizer-cache DIR, which also makes "
               f"DIR/{clip_tokenizer.BIGG_TOKENIZER_FOLDER} from them (see the README, 'SDXL'), or connect this "
               "computer to the internet.")
    offline = clip_tokenizer.offline_forced(env)
    if offline:
        return Check(name, False, f"kohya.tokenizer_cache_dir is not set, {what} {_is(absent)} not in the "
                     f"Hugging Face cache ({hub_cache}), and {offline} forbids downloading {_it(absent)}", fix)
    host, port, label = clip_tokenizer.hub_address(env)
    why = (reach or clip_tokenizer.reach)(host, port, clip_tokenizer.REACH_TIMEOUT_S)
    if why is None:
        return Check(name, True, f"kohya.tokenizer_cache_dir is not set and {what} {_is(absent)} not in the "
                     f"Hugging Face cache; {label} can be reached, so {_it(absent)} will be downloaded on the "
                     "first job")
    return Check(name, False, f"kohya.tokenizer_cache_dir is not set, {what} {_is(absent)} not in the "
                 f"Hugging Face cache ({hub_cache}), and {label} cannot be reached ({why})", fix)


def _what(ids: list[str] | tuple[str, ...], arch: str) -> str:
    if list(ids) == [clip_tokenizer.TOKENIZER_ID]:
        return "the CLIP tokenizer"
    if list(ids) == [clip_tokenizer.BIGG_TOKENIZER_ID]:
        return f"SDXL's second tokenizer ({clip_tokenizer.BIGG_TOKENIZER_ID})"
    return f"{ARCH_LABELS.get(arch, arch)}'s tokenizers ({', '.join(ids)})"


def _is(ids: list[str]) -> str:
    return "is" if len(ids) == 1 else "are"


def _it(ids: list[str]) -> str:
    return "it" if len(ids) == 1 else "them"


def _cache_dir_check(name: str, cache: Path, ids: tuple[str, ...], env: Mapping[str, str]) -> Check:
    """The daemon runs kohya offline when a cache dir is set, so every folder must be complete (bigG's may
    still be made from CLIP-L's: clip_tokenizer.derive_bigg)."""
    files = ", ".join(clip_tokenizer.TOKENIZER_FILES)
    folder = cache / TOKENIZER_FOLDER
    missing = clip_tokenizer.missing_files(folder)
    if missing:
        detail = f"{folder} is missing" if not folder.is_dir() else f"{folder} lacks {', '.join(missing)}"
        source = clip_tokenizer.cached_snapshot(env)
        where = (f"from {source}" if source else
                 f"of {clip_tokenizer.TOKENIZER_ID} from a computer with internet (see the README, 'offline')")
        return Check(name, False, detail, f"Copy the tokenizer files ({files}) {where} into {folder}.")
    found = [str(folder)]
    if clip_tokenizer.BIGG_TOKENIZER_ID in ids:
        bigg = cache / clip_tokenizer.BIGG_TOKENIZER_FOLDER
        if not bigg.exists():
            if not os.access(cache, os.W_OK):
                return Check(name, False, f"{bigg} is missing and {cache} cannot be written to",
                             f"Copy the files of {folder} ({files}) into {bigg}: SDXL's second tokenizer uses "
                             "the same files.")
            found.append(f"{bigg} (made from {folder.name} on the first SDXL job: the same files)")
        elif broken := clip_tokenizer.missing_files(bigg):
            return Check(name, False, f"{bigg} lacks {', '.join(broken)}",
                         f"Delete {bigg}: the daemon makes it again from {folder} on the next SDXL job.")
        else:
            found.append(str(bigg))
    return Check(name, True, ", ".join(found))


def tokenizer_readiness(config: Config, *, environ: Mapping[str, str] | None = None,
                        reach: clip_tokenizer.Reach | None = None) -> dict[str, Check]:
    """Per trainable family: will kohya find its tokenizers? SD 1.x ready and SDXL not must not stop SD 1.x jobs,
    so this is its own answer rather than one of run_checks' (each of which blocks training)."""
    probe = reach or clip_tokenizer.reach
    answers: dict[tuple[str, int], str | None] = {}

    def once(host: str, port: int, timeout_s: float) -> str | None:
        if (host, port) not in answers:  # one connection test serves every family
            answers[(host, port)] = probe(host, port, timeout_s)
        return answers[(host, port)]

    return {arch: check_tokenizer(config, arch=arch, environ=environ, reach=once)
            for arch in clip_tokenizer.TOKENIZERS_BY_ARCH}


def prepare_tokenizers(config: Config, arch: str, *, environ: Mapping[str, str] | None = None,
                       reach: clip_tokenizer.Reach | None = None) -> tuple[Check, Path | None]:
    """Before an SDXL job: make bigG's folder from CLIP-L's when it can (returned), then the family's check."""
    cache = config.kohya.tokenizer_cache_dir
    made = None
    if arch == "sdxl" and cache is not None:
        try:
            made = clip_tokenizer.derive_bigg(cache)
        except OSError as exc:
            bigg = cache / clip_tokenizer.BIGG_TOKENIZER_FOLDER
            return Check("tokenizer_sdxl", False, f"{bigg} could not be made ({exc.strerror or exc})",
                         f"Copy the files of {cache / TOKENIZER_FOLDER} into {bigg}: SDXL's second tokenizer uses "
                         "the same files."), None
    return check_tokenizer(config, arch=arch, environ=environ, reach=reach), made


def check_gpu(gpu: GpuInfo, allow_cpu: bool) -> Check:
    if gpu.cuda:
        return Check("gpu", True, f"{gpu.name}, {gpu.vram_gb} GB VRAM (torch {gpu.torch})")
    why = gpu.error or f"torch {gpu.torch} sees no CUDA device"
    if allow_cpu:
        return Check("gpu", True, f"no CUDA GPU ({why}); training on the CPU because allow_cpu is true (very slow)")
    return Check("gpu", False, f"no CUDA GPU ({why})",
                 "Install a CUDA build of torch in the kohya venv, or set allow_cpu: true to train (very slowly) "
                 "on the CPU.")


def run_checks(config: Config, gpu: GpuInfo, *, reach: clip_tokenizer.Reach | None = None) -> list[Check]:
    return [
        check_script(config),
        check_workspace(config),
        check_launcher(config, gpu),
        check_base_model(config.base_model, config.ed_models_dir),
        check_lora_dir(config.ed_lora_dir),
        check_disk(config.data_dir),
        check_tokenizer(config, reach=reach),
        check_gpu(gpu, config.allow_cpu),
    ]


def check_tagger(config: Config, probe: object | None = None, *, refresh: bool = False) -> Check:
    """Can kohya's WD14 tagger run (automatic tags), and is its model cached? Never blocks training: /config/test
    shows it beside the checks, not among them."""
    from daemon.pipeline import tagger  # imported here: tagger.py uses this module's kohya_python

    ready = tagger.readiness(tagger.tagger_setup(config), probe if isinstance(probe, tagger.OnnxProbe)
                             else tagger.OnnxProbe(), refresh=refresh)
    fix = ready.problems[0].fix if ready.problems else ""
    return Check("tagger", ready.available, ready.summary, fix)


FACE_CHECK_TIMEOUT_S = 60


def check_face_crop(config: Config) -> Check:
    """Can the optional face crop run: the kohya python with OpenCV and its Haar cascade? Never blocks training
    (a job asking for the crop trains on the whole pictures without it), so it is not one of run_checks'."""
    from daemon.pipeline.faces import DetectorFailed, detector_argv, detector_env  # faces imports this module

    fix = "Install opencv-python into the sd-scripts venv (its requirements include it), or leave the face crop off."
    try:
        argv = detector_argv(config)
    except DetectorFailed as exc:
        return Check("face_crop", False, f"face crop unavailable: {exc.message}", fix)
    try:
        done = subprocess.run([*argv, "--check"], capture_output=True, text=True, timeout=FACE_CHECK_TIMEOUT_S,
                              env=detector_env(), creationflags=NO_WINDOW)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("face_crop", False, f"face crop unavailable: the face finder could not run ({exc})", fix)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        why = lines[-1].removeprefix("face_detect: ") if lines else f"the face finder exited with {done.returncode}"
        return Check("face_crop", False, f"face crop unavailable: {why}", fix)
    try:
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Check("face_crop", False, "face crop unavailable: the face finder's answer is not JSON", fix)
    return Check("face_crop", True, f"face crop available (OpenCV {info.get('opencv', '?')} in {argv[0]})")
