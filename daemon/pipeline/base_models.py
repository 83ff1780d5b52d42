"""Base models as Easy Diffusion names them: ids relative to `<models>/stable-diffusion`, no extension.

A client only ever sends such an id; it is matched against the files that really exist there, so it
can never point anywhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import BadInput
from daemon.pipeline.model_arch import MODEL_EXTENSIONS, Arch, detect_arch

SD_FOLDERS = ("stable-diffusion", "Stable-diffusion")


@dataclass(frozen=True)
class BaseModel:
    id: str
    path: Path
    arch: Arch

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "file": self.path.name, "arch": self.arch}


def _roots(models_dir: Path | None) -> list[Path]:
    if models_dir is None:
        return []
    return [models_dir / name for name in SD_FOLDERS if (models_dir / name).is_dir()]


def list_models(models_dir: Path | None) -> dict[str, Path]:
    """id -> file, for every checkpoint under the stable-diffusion folder(s)."""
    found: dict[str, Path] = {}
    for root in _roots(models_dir):
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                path = Path(folder) / name
                if path.suffix.lower() in MODEL_EXTENSIONS and not name.startswith("."):
                    found.setdefault(path.relative_to(root).with_suffix("").as_posix(), path)
    return found


def describe_models(models_dir: Path | None) -> list[BaseModel]:
    return [BaseModel(id=i, path=p, arch=detect_arch(p)) for i, p in sorted(list_models(models_dir).items())]


def resolve_model(requested: str | None, *, models_dir: Path | None, default: Path | None) -> Path:
    """The checkpoint for a /train request. Raises BadInput(key='base_model') with the reason."""
    if not requested:
        if default is None:
            raise BadInput(
                "No base model was chosen and the daemon has no default base_model.",
                key="base_model",
                hint="Pick an SD 1.x or SDXL model in Easy Diffusion or set base_model in the daemon config.",
            )
        return default
    wanted = requested.strip().replace("\\", "/")
    models = list_models(models_dir)
    if not models:
        raise BadInput(
            f"Base model '{requested}' cannot be found: the daemon knows no Easy Diffusion models folder.",
            key="base_model",
            hint="Set ed_models_dir in the daemon config (install_plugin.py does this).",
        )
    stem = wanted.rsplit(".", 1)[0] if wanted.lower().endswith(MODEL_EXTENSIONS) else wanted
    path = models.get(stem)
    if path is None:
        raise BadInput(
            f"Base model '{requested}' is not in {models_dir}/stable-diffusion.",
            key="base_model",
            hint="Choose one of the models listed by Easy Diffusion.",
        )
    return path
