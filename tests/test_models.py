"""Base models: architecture from checkpoint keys; ED ids resolved only to files that exist there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.errors import BadInput
from daemon.pipeline.base_models import describe_models, resolve_model
from daemon.pipeline.model_arch import arch_from_keys, detect_arch
from tests.helpers import write_sd1_checkpoint, write_sdxl_checkpoint


@pytest.mark.parametrize(("keys", "arch"), [
    (["cond_stage_model.transformer.text_model.x"], "sd1"),
    (["cond_stage_model.model.transformer.resblocks.0.x"], "sd2"),
    (["conditioner.embedders.1.model.x", "model.diffusion_model.x"], "sdxl"),
    (["model.diffusion_model.x"], "unknown"),
])
def test_arch_from_keys(keys: list[str], arch: str) -> None:
    assert arch_from_keys(keys) == arch


def test_detect_arch_on_files_and_diffusers_folders(tmp_path: Path) -> None:
    assert detect_arch(write_sd1_checkpoint(tmp_path / "a.safetensors")) == "sd1"
    assert detect_arch(write_sdxl_checkpoint(tmp_path / "b.safetensors")) == "sdxl"
    (tmp_path / "c.ckpt").write_bytes(b"pickle")
    assert detect_arch(tmp_path / "c.ckpt") == "unknown"
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    assert detect_arch(tmp_path / "junk.safetensors") == "unknown"
    folder = tmp_path / "diff"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768}))
    assert detect_arch(folder) == "sd1"


def test_resolve_by_ed_id_only_inside_the_models_folder(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_sd1_checkpoint(models / "stable-diffusion" / "sub" / "mine.safetensors")
    secret = write_sd1_checkpoint(tmp_path / "outside.safetensors")
    assert resolve_model("sub/mine", models_dir=models, default=None).name == "mine.safetensors"
    assert resolve_model("sub\\mine.safetensors", models_dir=models, default=None).name == "mine.safetensors"
    for bad in ("../outside", str(secret), "/etc/passwd", "sub/../../outside", "nope"):
        with pytest.raises(BadInput) as info:
            resolve_model(bad, models_dir=models, default=None)
        assert info.value.key == "base_model"
    assert resolve_model(None, models_dir=models, default=secret) == secret
    with pytest.raises(BadInput):
        resolve_model("", models_dir=models, default=None)


def test_describe_lists_ids_and_architectures(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_sd1_checkpoint(models / "stable-diffusion" / "sd-v1-5.safetensors")
    write_sdxl_checkpoint(models / "stable-diffusion" / "xl" / "base.safetensors")
    (models / "stable-diffusion" / "readme.txt").write_text("Place your models here.")
    assert [m.to_json() for m in describe_models(models)] == [
        {"id": "sd-v1-5", "file": "sd-v1-5.safetensors", "arch": "sd1"},
        {"id": "xl/base", "file": "base.safetensors", "arch": "sdxl"},
    ]
