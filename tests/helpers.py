"""Small builders shared by the tests: pictures, a tiny SD1-shaped checkpoint, a test config."""

from __future__ import annotations

import io
import os
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

from daemon.config import Config, parse_config

REPO = Path(__file__).resolve().parent.parent
KOHYA_DOUBLE = REPO / "tests" / "kohya_double" / "train_network.py"
KOHYA_SDXL_DOUBLE = KOHYA_DOUBLE.parent / "sdxl_train_network.py"
TOKEN = "test-token-0123456789abcdef"


def picture_bytes(index: int, *, size: tuple[int, int] = (96, 128), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    colour = ((index * 67) % 256, (index * 131) % 256, (index * 29) % 256)
    img = Image.new(mode, size, colour if mode == "RGB" else (*colour, 128))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_sd1_checkpoint(path: Path) -> Path:
    """Not a model: just the key layout detect_arch reads (SD1: cond_stage_model.transformer.*)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "cond_stage_model.transformer.text_model.embeddings.position_ids": np.zeros((1, 4), dtype=np.int64),
            "model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4), dtype=np.float16),
        },
        str(path),
    )
    return path


def write_sdxl_checkpoint(path: Path) -> Path:
    """Not a model: the key layout of an SDXL single file (CLIP-L, OpenCLIP bigG, the U-Net's size embedding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": np.zeros((1, 4), dtype=np.int64),
            "conditioner.embedders.1.model.text_projection": np.zeros((2, 2), dtype=np.float16),
            "model.diffusion_model.label_emb.0.0.weight": np.zeros((2, 2), dtype=np.float16),
        },
        str(path),
    )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_config(root: Path, *, port: int, **overrides: Any) -> Config:
    """A daemon config that trains with the kohya test double, entirely under `root`."""
    models = root / "ed" / "models"
    write_sd1_checkpoint(models / "stable-diffusion" / "sd-test.safetensors")
    workspace = root / "workspace"
    workspace.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {
        "port": port,
        "token": TOKEN,
        "data_dir": str(root / "data"),
        "ed_lora_dir": str(models / "lora"),
        "ed_models_dir": str(models),
        "base_model": str(models / "stable-diffusion" / "sd-test.safetensors"),
        "allow_cpu": True,
        "kohya": {
            "python": sys.executable,
            "script_path": str(KOHYA_DOUBLE),
            "workspace": str(workspace),
        },
    }
    for key, value in overrides.items():
        if key == "kohya":
            raw["kohya"].update(value)
        else:
            raw[key] = value
    return parse_config(raw, base_dir=root)


# Test double of torch for the daemon's GPU probe, which runs `import torch` in the kohya python (the daemon itself
# never imports torch, and neither does the kohya double): one card as torch describes it.
_TORCH_DOUBLE = """
__version__ = "2.4.0+fake"


class _Props:
    name = {name!r}
    total_memory = {total_memory}
    major, minor = {major}, {minor}


class cuda:
    @staticmethod
    def is_available():
        return True

    @staticmethod
    def get_device_properties(index):
        return _Props()
"""


def torch_double_path(folder: Path, *, name: str = "NVIDIA GeForce RTX 4090", total_memory: int = 25_757_220_864,
                      major: int = 8, minor: int = 9) -> str:
    """Write the torch double into `folder`/fake-torch and return a PYTHONPATH that finds it first. The defaults are
    an RTX 4090: 23.99 GiB as torch reports its 24 GB, compute capability 8.9 (native bf16)."""
    site = folder / "fake-torch"
    site.mkdir(parents=True, exist_ok=True)
    (site / "torch.py").write_text(_TORCH_DOUBLE.format(name=name, total_memory=total_memory, major=major,
                                                        minor=minor), encoding="utf-8")
    return os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
