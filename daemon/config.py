"""The daemon's YAML configuration: defaults, path expansion, validation, first-start writing.

Every setting is declared once in SETTINGS (name, default, help) so the README and the validator
cannot drift apart (tests/test_docs.py checks the README names each one).
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import platformdirs
import yaml

APP_NAME = "ed-character-lora"
# 9000 is ED, 7860 Forge/A1111 (and ED's v3.5/v4 backends), 8188 ComfyUI, 8000/8080 common dev servers.
DEFAULT_PORT = 9131
FORBIDDEN_PORTS = frozenset({9000, 7860, 8188})
DEFAULT_ORIGINS = ("http://localhost:9000", "http://127.0.0.1:9000")


class ConfigError(Exception):
    """An invalid setting: `key` names it, the message says what is wrong and what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "127.0.0.1", "address to bind; keep 127.0.0.1 unless you know why"),
    Setting("port", DEFAULT_PORT, "TCP port (never 9000/7860/8188: those belong to ED, Forge and ComfyUI)"),
    Setting("token", None, "secret every mutating call must send; generated and saved on first start"),
    Setting("data_dir", None, "jobs, uploads and the SQLite database (default: the per-user data dir)"),
    Setting("ed_lora_dir", None, "where finished LoRAs are published: ED's models/lora (default: <data_dir>/lora)"),
    Setting("ed_models_dir", None, "ED's models folder; base models are looked up in its stable-diffusion/"),
    Setting("base_model", None, "default base checkpoint (.safetensors/.ckpt) when a job names none"),
    Setting("allowed_origins", list(DEFAULT_ORIGINS), "browser origins allowed to call the daemon (CORS)"),
    Setting("allow_cpu", False, "train on the CPU when no CUDA GPU is found (very slow; for tests)"),
    Setting("max_image_mb", 25, "largest accepted upload, per image, in MiB"),
    Setting("max_request_mb", 400, "largest accepted /train request, in MiB"),
    Setting("max_uploads", 2, "uploads (POST /train) streamed at the same time; one more is answered 429"),
    Setting("max_queued_jobs", 10, "jobs waiting in the queue; one more is answered 429"),
    Setting("auto_resume", True, "at start-up, continue jobs a crash interrupted, from their saved state"),
    Setting("oom_retries", 2, "after running out of GPU memory, retry (0-2 times), one memory tier lower each"),
    Setting("fast_start", True, "start kohya and warm the base model while pictures are prepared"),
    Setting("upload_stall_s", 60, "seconds an upload may send nothing before it is answered 408"),
    Setting("upload_timeout_s", 1800, "seconds a whole upload may take before it is answered 408"),
    Setting("kohya.script_path", None, "sd-scripts' train_network.py"),
    Setting("kohya.workspace", None, "the sd-scripts folder (the trainer's working directory)"),
    Setting("kohya.accelerate_bin", "accelerate", "the `accelerate` launcher of the kohya venv"),
    Setting("kohya.python", None, "the kohya venv's python; when set the script is run with it directly"),
    Setting("kohya.tokenizer_cache_dir", None, "folder holding openai_clip-vit-large-patch14 for offline runs"),
    Setting("kohya.extra_args", [], "extra train_network.py arguments appended last (list of strings)"),
    Setting("kohya.face_detect_script", None,
            "the face finder the kohya python runs for the face crop (default: the daemon's face_detect.py)"),
)

_TOP_KEYS = {s.name for s in SETTINGS if "." not in s.name} | {"kohya"}
_KOHYA_KEYS = {s.name.split(".", 1)[1] for s in SETTINGS if s.name.startswith("kohya.")}


@dataclass(frozen=True)
class KohyaConfig:
    script_path: Path | None = None
    workspace: Path | None = None
    accelerate_bin: str = "accelerate"
    python: Path | None = None
    tokenizer_cache_dir: Path | None = None
    extra_args: tuple[str, ...] = ()
    face_detect_script: Path | None = None  # None: daemon/pipeline/face_detect.py


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    token: str
    data_dir: Path
    ed_lora_dir: Path
    ed_models_dir: Path | None
    base_model: Path | None
    allowed_origins: tuple[str, ...]
    allow_cpu: bool
    max_image_bytes: int
    max_request_bytes: int
    kohya: KohyaConfig = field(default_factory=KohyaConfig)
    path: Path | None = None
    max_uploads: int = 2
    max_queued_jobs: int = 10
    upload_stall_s: int = 60
    upload_timeout_s: int = 1800
    auto_resume: bool = True
    oom_retries: int = 2
    fast_start: bool = True

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "config.yaml"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


_WIN_VAR = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")


def expand_path(value: str, base_dir: Path | None) -> Path:
    """`~`, `$VAR`, `${VAR}` and `%VAR%` on every OS; relative paths resolve against the config's folder."""
    text = _WIN_VAR.sub(lambda m: os.environ.get(m.group(1), m.group(0)), value)
    text = os.path.expanduser(os.path.expandvars(text))
    path = Path(text)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _opt_path(raw: Mapping[str, Any], key: str, base_dir: Path | None, label: str | None = None) -> Path | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(label or key, f"expected a path (text), got {type(value).__name__}")
    return expand_path(value, base_dir)


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _int(raw: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(key, f"expected a whole number from {lo} to {hi}, got {value!r}")
    return value


def parse_config(raw: Mapping[str, Any], *, base_dir: Path | None, path: Path | None = None) -> Config:
    """Validate a loaded YAML mapping. Raises ConfigError naming the first bad key."""
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(unknown[0], f"unknown setting; known settings are {', '.join(sorted(_TOP_KEYS))}")

    host = raw.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host.strip():
        raise ConfigError("host", "expected an address such as 127.0.0.1")
    port = _int(raw, "port", DEFAULT_PORT, 1, 65535)
    if port in FORBIDDEN_PORTS:
        raise ConfigError("port", f"{port} belongs to Easy Diffusion, Forge/A1111 or ComfyUI; pick another")
    token = raw.get("token")
    if not isinstance(token, str) or len(token) < 16:
        raise ConfigError("token", "expected a secret of at least 16 characters (delete it to get a new one)")

    data_dir = _opt_path(raw, "data_dir", base_dir) or default_data_dir()
    ed_lora_dir = _opt_path(raw, "ed_lora_dir", base_dir) or data_dir / "lora"
    origins = raw.get("allowed_origins", list(DEFAULT_ORIGINS))
    if not isinstance(origins, list) or not all(isinstance(o, str) and o.startswith("http") for o in origins):
        raise ConfigError("allowed_origins", "expected a list of origins such as http://localhost:9000")

    kohya_raw = raw.get("kohya") or {}
    if not isinstance(kohya_raw, Mapping):
        raise ConfigError("kohya", "expected a section with script_path, workspace, ...")
    unknown = sorted(set(kohya_raw) - _KOHYA_KEYS)
    if unknown:
        raise ConfigError(f"kohya.{unknown[0]}", f"unknown setting; known: {', '.join(sorted(_KOHYA_KEYS))}")
    extra = kohya_raw.get("extra_args") or []
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise ConfigError("kohya.extra_args", "expected a list of strings such as ['--noise_offset', '0.05']")
    accelerate_bin = kohya_raw.get("accelerate_bin") or "accelerate"
    if not isinstance(accelerate_bin, str):
        raise ConfigError("kohya.accelerate_bin", "expected a program name or path")
    if any(sep in accelerate_bin for sep in ("/", "\\")) or accelerate_bin.startswith(("~", "$", "%", ".")):
        accelerate_bin = str(expand_path(accelerate_bin, base_dir))

    kohya = KohyaConfig(
        script_path=_opt_path(kohya_raw, "script_path", base_dir, "kohya.script_path"),
        workspace=_opt_path(kohya_raw, "workspace", base_dir, "kohya.workspace"),
        accelerate_bin=accelerate_bin,
        python=_opt_path(kohya_raw, "python", base_dir, "kohya.python"),
        tokenizer_cache_dir=_opt_path(kohya_raw, "tokenizer_cache_dir", base_dir, "kohya.tokenizer_cache_dir"),
        extra_args=tuple(extra),
        face_detect_script=_opt_path(kohya_raw, "face_detect_script", base_dir, "kohya.face_detect_script"),
    )
    stall = _int(raw, "upload_stall_s", 60, 1, 3600)
    if kohya.workspace is None and kohya.script_path is not None:
        kohya = KohyaConfig(**{**kohya.__dict__, "workspace": kohya.script_path.parent})

    return Config(
        host=host.strip(),
        port=port,
        token=token,
        data_dir=data_dir,
        ed_lora_dir=ed_lora_dir,
        ed_models_dir=_opt_path(raw, "ed_models_dir", base_dir),
        base_model=_opt_path(raw, "base_model", base_dir),
        allowed_origins=tuple(origins),
        allow_cpu=_bool(raw, "allow_cpu", False),
        max_image_bytes=_int(raw, "max_image_mb", 25, 1, 500) * 1024 * 1024,
        max_request_bytes=_int(raw, "max_request_mb", 400, 1, 10_000) * 1024 * 1024,
        kohya=kohya,
        path=path,
        max_uploads=_int(raw, "max_uploads", 2, 1, 64),
        max_queued_jobs=_int(raw, "max_queued_jobs", 10, 1, 1000),
        upload_stall_s=stall,
        upload_timeout_s=_int(raw, "upload_timeout_s", 1800, stall, 86_400),
        auto_resume=_bool(raw, "auto_resume", True),
        oom_retries=_int(raw, "oom_retries", 2, 0, 2),
        fast_start=_bool(raw, "fast_start", True),
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("(file)", f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("(file)", f"{path} must hold a mapping of settings")
    return data


def write_yaml_atomic(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".yaml", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(dict(data), fh, sort_keys=False, allow_unicode=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_settings() -> dict[str, Any]:
    """What a first start writes: every top-level setting, so the file documents itself."""
    return {
        "host": "127.0.0.1",
        "port": DEFAULT_PORT,
        "token": secrets.token_urlsafe(32),
        "data_dir": str(default_data_dir()),
        "ed_lora_dir": None,
        "ed_models_dir": None,
        "base_model": None,
        "allowed_origins": list(DEFAULT_ORIGINS),
        "allow_cpu": False,
        "kohya": {
            "script_path": None,
            "workspace": None,
            "accelerate_bin": "accelerate",
            "python": None,
            "tokenizer_cache_dir": None,
            "extra_args": [],
        },
    }


def update_config_file(path: Path, updates: Mapping[str, Any]) -> None:
    """Merge `updates` into the YAML at `path` (nested `kohya:` merged key by key), keeping other keys."""
    data = read_yaml(path) or default_settings()
    for key, value in updates.items():
        if key == "kohya" and isinstance(value, Mapping):
            section = dict(data.get("kohya") or {})
            section.update(value)
            data["kohya"] = section
        else:
            data[key] = value
    write_yaml_atomic(path, data)


def load_config(path: Path) -> Config:
    """Load and validate; a missing token is generated and saved (first start with a hand-written file)."""
    raw = read_yaml(path)
    if not raw.get("token"):
        raw["token"] = secrets.token_urlsafe(32)
        update_config_file(path, {"token": raw["token"]})
    return parse_config(raw, base_dir=path.parent, path=path)


def prepare_data_dir(config: Config) -> None:
    """Create the data folder and prove it is writable, or raise ConfigError saying which folder and why."""
    where = f" in {config.path}" if config.path else ""
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=config.data_dir):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError("data_dir", f"cannot create or write the data folder {config.data_dir} ({reason}); "
                          f"make it writable or set data_dir{where} to a folder you can write to") from exc


def load_or_create(path: Path | None) -> tuple[Config, Path, bool]:
    """The config at `path` (default: the per-user config dir), written with defaults if it is missing."""
    path = path or default_config_path()
    created = False
    if not path.exists():
        write_yaml_atomic(path, default_settings())
        created = True
    return load_config(path), path, created


# The server listens on host:port and keeps its database and jobs under data_dir: a running daemon cannot move.
RESTART_KEYS = frozenset({"host", "port", "data_dir"})
_MIB = 1024 * 1024


class LiveConfig:
    """The settings in force now. A reload replaces `current` as a whole, so a reader that takes it once
    (a request, a job when it starts) works with one consistent Config throughout."""

    def __init__(self, config: Config) -> None:
        self.current = config


def setting_values(config: Config) -> dict[str, Any]:
    """Each setting of SETTINGS by its name, as the config holds it (sizes back in MiB)."""
    k = config.kohya
    return {
        "host": config.host, "port": config.port, "token": config.token, "data_dir": config.data_dir,
        "ed_lora_dir": config.ed_lora_dir, "ed_models_dir": config.ed_models_dir, "base_model": config.base_model,
        "allowed_origins": config.allowed_origins, "allow_cpu": config.allow_cpu,
        "max_image_mb": config.max_image_bytes // _MIB, "max_request_mb": config.max_request_bytes // _MIB,
        "max_uploads": config.max_uploads, "max_queued_jobs": config.max_queued_jobs,
        "upload_stall_s": config.upload_stall_s, "upload_timeout_s": config.upload_timeout_s,
        "auto_resume": config.auto_resume, "oom_retries": config.oom_retries, "fast_start": config.fast_start,
        "kohya.script_path": k.script_path, "kohya.workspace": k.workspace, "kohya.accelerate_bin": k.accelerate_bin,
        "kohya.python": k.python, "kohya.tokenizer_cache_dir": k.tokenizer_cache_dir,
        "kohya.extra_args": k.extra_args, "kohya.face_detect_script": k.face_detect_script,
    }


def changed_settings(old: Config, new: Config) -> list[str]:
    """Names of the settings whose values differ, in SETTINGS order."""
    before, after = setting_values(old), setting_values(new)
    return [s.name for s in SETTINGS if before[s.name] != after[s.name]]


@dataclass(frozen=True)
class Reload:
    file_config: Config  # what the file says now
    running: Config  # what the daemon runs with from now on: the file, but host/port/data_dir as they were
    changed: tuple[str, ...]  # applied live
    restart_needed: tuple[str, ...]  # edited in the file, kept at their running values


def reload_config(path: Path, running: Config, last_file: Config) -> Reload:
    """Re-read the config file of a running daemon. `last_file` is what the file said at the last read
    (--host/--port may make it differ from `running`). Raises ConfigError naming the bad key."""
    if not path.is_file():
        raise ConfigError("(file)", f"{path} is missing")
    try:
        raw = read_yaml(path)
    except (OSError, UnicodeError) as exc:
        raise ConfigError("(file)", f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc})") from exc
    if not raw:
        raise ConfigError("(file)", f"{path} holds no settings")
    if not raw.get("token"):
        # Never generated here (load_config does it at start): an editor still writing the file would lose its save.
        raise ConfigError("token", "is missing; set a secret of at least 16 characters, or delete the line and "
                                   "restart the daemon to have one generated")
    new = parse_config(raw, base_dir=path.parent, path=path)
    lora_dir = new.ed_lora_dir if raw.get("ed_lora_dir") else running.data_dir / "lora"  # the default follows data_dir
    applied = replace(new, host=running.host, port=running.port, data_dir=running.data_dir, ed_lora_dir=lora_dir,
                      path=running.path)
    restart = tuple(k for k in changed_settings(last_file, new) if k in RESTART_KEYS)
    return Reload(file_config=new, running=applied, changed=tuple(changed_settings(running, applied)),
                  restart_needed=restart)
