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
from dataclasses import asdict, dataclass
from pathlib import Path

from daemon.config import Config
from daemon.pipeline.base_models import list_models
from daemon.pipeline.model_arch import ARCH_LABELS, TRAINABLE_ARCHS, detect_arch
from daemon.pipeline.process import NO_WINDOW

MIN_FREE_BYTES = 2 * 1024**3
GPU_PROBE_TIMEOUT_S = 90
TOKENIZER_FOLDER = "openai_clip-vit-large-patch14"

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
    fix = "Set base_model in the daemon config, or put an SD 1.x model into Easy Diffusion's models/stable-diffusion."
    if path is None:
        trainable = [p for p in list_models(models_dir).values() if detect_arch(p) in TRAINABLE_ARCHS]
        if trainable:
            # The ED tab always sends the model selected in ED; a default is only for other clients.
            return Check("base_model", True, f"no default; {len(trainable)} SD 1.x model(s) in {models_dir}")
        return Check("base_model", False, "no default base model is configured and none was found in ED's folder", fix)
    if not path.exists():
        return Check("base_model", False, f"{path} does not exist", fix)
    arch = detect_arch(path)
    label = ARCH_LABELS[arch]
    if arch not in TRAINABLE_ARCHS and arch != "unknown":
        return Check("base_model", False, f"{path.name} is {label}; only SD 1.x models can be trained for now",
                     "Choose an SD 1.x checkpoint (e.g. sd-v1-5) as the base model.")
    note = "" if arch == "sd1" else " (architecture could not be read; assuming SD 1.x)"
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


def check_tokenizer(config: Config) -> Check:
    cache = config.kohya.tokenizer_cache_dir
    if cache is None:
        return Check("tokenizer", True, "kohya.tokenizer_cache_dir is not set: kohya downloads the CLIP tokenizer"
                     " on its first run (needs internet once)")
    if not (cache / TOKENIZER_FOLDER).is_dir():
        return Check("tokenizer", False, f"{cache / TOKENIZER_FOLDER} is missing",
                     "Run one kohya training online with --tokenizer_cache_dir, or copy the tokenizer folder there.")
    return Check("tokenizer", True, str(cache / TOKENIZER_FOLDER))


def check_gpu(gpu: GpuInfo, allow_cpu: bool) -> Check:
    if gpu.cuda:
        return Check("gpu", True, f"{gpu.name}, {gpu.vram_gb} GB VRAM (torch {gpu.torch})")
    why = gpu.error or f"torch {gpu.torch} sees no CUDA device"
    if allow_cpu:
        return Check("gpu", True, f"no CUDA GPU ({why}); training on the CPU because allow_cpu is true (very slow)")
    return Check("gpu", False, f"no CUDA GPU ({why})",
                 "Install a CUDA build of torch in the kohya venv, or set allow_cpu: true to train (very slowly) "
                 "on the CPU.")


def run_checks(config: Config, gpu: GpuInfo) -> list[Check]:
    return [
        check_script(config),
        check_workspace(config),
        check_launcher(config, gpu),
        check_base_model(config.base_model, config.ed_models_dir),
        check_lora_dir(config.ed_lora_dir),
        check_disk(config.data_dir),
        check_tokenizer(config),
        check_gpu(gpu, config.allow_cpu),
    ]
