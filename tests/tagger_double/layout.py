"""Lay out a folder like sd-scripts with the tagger double at finetune/, for tests that point the daemon at it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOUBLE = HERE / "tag_images_by_wd14_tagger.py"
SITE = HERE / "site"  # stand-ins for the onnx and onnxruntime packages
REPO_FOLDER = "SmilingWolf_wd-v1-4-convnext-tagger-v2"


def sd_scripts_with_double(root: Path) -> Path:
    """`root`/sd-scripts/finetune/tag_images_by_wd14_tagger.py = the double; returns the sd-scripts folder."""
    folder = root / "sd-scripts"
    (folder / "finetune").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DOUBLE, folder / "finetune" / DOUBLE.name)
    return folder


def onnx_pythonpath() -> str:
    """A PYTHONPATH under which the kohya python (here the test python) imports onnx and onnxruntime."""
    return os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p)


def write_model(model_dir: Path) -> Path:
    """The files --onnx needs, as a finished download leaves them (contents do not matter to the double)."""
    location = model_dir / REPO_FOLDER
    location.mkdir(parents=True, exist_ok=True)
    (location / "selected_tags.csv").write_text("tag_id,name,category,count\n0,general,9,0\n", encoding="utf-8")
    (location / "model.onnx").write_bytes(b"\x08\x07double-onnx-model")
    return location
