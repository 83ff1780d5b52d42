"""An SDXL job through the real daemon and runner, trained by the SDXL test double (a real subprocess).

The jobs are handed to the daemon's queue as /train stores them (uploads on disk, resolved params), so these tests
hold the runner's side: the script it picks, what it checks before kohya starts, the tokenizer it prepares.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from daemon.config import Config
from daemon.jobs.models import Job
from daemon.pipeline.clip_tokenizer import BIGG_TOKENIZER_FOLDER, TOKENIZER_FILES, TOKENIZER_FOLDER
from daemon.pipeline.dataset import UPLOAD_SUFFIX, write_upload_names
from daemon.pipeline.dataset import Upload as StoredUpload
from daemon.pipeline.params import PRESETS, TrainParams
from daemon.pipeline.runner import job_paths
from daemon.web.keys import QUEUE
from tests.conftest import wait_for_state
from tests.helpers import KOHYA_DOUBLE, free_port, make_config, picture_bytes, write_sdxl_checkpoint
from tests.tokenizer_files import write_tokenizer

# What fit.py picks for SDXL on a CPU, small enough for the double: U-Net only with cached text-encoder outputs.
SDXL = replace(PRESETS["balanced"], arch="sdxl", memory_tier="cpu", resolution=256, epochs=2, repeats=1, batch_size=2,
               text_encoder_lr=0.0, cache_text_encoder_outputs=True, gradient_checkpointing=True,
               mixed_precision="no", optimizer="AdamW", save_every_n_epochs=1, sample_every_n_epochs=0)


def sdxl_config(root: Path, **kohya: Any) -> Config:
    """The daemon config of a user with an SDXL model and a tokenizer cache holding CLIP-L's files only."""
    write_tokenizer(root / "tokenizers" / TOKENIZER_FOLDER)
    cfg = make_config(root, port=free_port(), kohya={"tokenizer_cache_dir": str(root / "tokenizers"), **kohya})
    write_sdxl_checkpoint(cfg.ed_models_dir / "stable-diffusion" / "xl-test.safetensors")  # type: ignore[operator]
    return cfg


async def submit(client: Any, cfg: Config, params: TrainParams, model: str = "xl-test.safetensors",
                 count: int = 4) -> str:
    """Store a job as /train does (uploads with their names, resolved params) and queue it."""
    job_id = uuid.uuid4().hex[:12]
    uploads = job_paths(cfg, job_id).uploads
    uploads.mkdir(parents=True)
    stored = []
    for i in range(count):
        path = uploads / f"{i:04d}{UPLOAD_SUFFIX}"
        path.write_bytes(picture_bytes(i, size=(256, 256)))
        stored.append(StoredUpload(path, f"pic{i}.png"))
    write_upload_names(uploads, stored)
    job = Job(id=job_id, name="XL Hero", trigger="ohwx", class_token="person",
              base_model=str(cfg.ed_models_dir / "stable-diffusion" / model),  # type: ignore[operator]
              params=params.to_json(), image_count=count, created_at=time.time())
    await client.server.app[QUEUE].submit(job)
    return job_id


async def job_log(client: Any, job_id: str) -> list[str]:
    """Every line the job logged (the status answer holds only the last ones)."""
    return (await (await client.get(f"/jobs/{job_id}/logs")).json())["lines"]


async def test_sdxl_job_trains_with_the_sdxl_script_and_publishes_an_sdxl_lora(start_daemon, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "argv.json"
    monkeypatch.setenv("KOHYA_DOUBLE_RECORD", str(record))
    cfg = sdxl_config(tmp_path)
    client = await start_daemon(cfg)
    job_id = await submit(client, cfg, SDXL)
    job = await wait_for_state(client, job_id, {"done", "error"})
    assert job["state"] == "done", (job["error"], job["logs"][-20:])
    # the caching phases' unnamed bars are not taken for training steps: 4 pictures, batch 2, 2 epochs
    assert job["progress"]["step"] == job["progress"]["total"] == 4
    # The daemon runs kohya offline with a cache dir: the double only got this far because the runner made
    # SDXL's second tokenizer from CLIP-L's files.
    bigg = tmp_path / "tokenizers" / BIGG_TOKENIZER_FOLDER
    assert sorted(p.name for p in bigg.iterdir()) == sorted(TOKENIZER_FILES)
    for name in TOKENIZER_FILES:
        assert (bigg / name).read_bytes() == (tmp_path / "tokenizers" / TOKENIZER_FOLDER / name).read_bytes()
    lines = await job_log(client, job_id)
    plan = next(line for line in lines if line.startswith("training SDXL"))
    assert plan == ("training SDXL with sdxl_train_network.py on the CPU: tier cpu, batch 2, fp32, "
                    "gradient checkpointing, text encoders cached, no fp8")
    command = next(line for line in lines if line.startswith("$ "))
    assert str(KOHYA_DOUBLE.parent / "sdxl_train_network.py") in command.split()
    argv = json.loads(record.read_text())
    assert {"--cache_text_encoder_outputs", "--network_train_unet_only", "--gradient_checkpointing"} <= set(argv)
    trainer_log = job_paths(cfg, job_id).trainer_log.read_text(encoding="utf-8")
    assert f"load tokenizer from cache: {bigg}" in trainer_log
    assert "caching Text Encoder outputs..." in trainer_log
    assert job["artifact"].startswith(str(cfg.ed_lora_dir))
    with safe_open(job["artifact"], framework="numpy") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.trigger_phrase"] == "ohwx"


async def test_missing_sdxl_script_fails_the_job_with_a_sentence_naming_it(start_daemon, tmp_path: Path) -> None:
    alone = tmp_path / "old-sd-scripts" / "train_network.py"
    alone.parent.mkdir()
    shutil.copy(KOHYA_DOUBLE, alone)  # an sd-scripts folder without sdxl_train_network.py
    cfg = sdxl_config(tmp_path, script_path=str(alone))
    client = await start_daemon(cfg)
    job = await wait_for_state(client, await submit(client, cfg, SDXL), {"done", "error"})
    assert job["state"] == "error"
    assert job["error"]["kind"] == "setup"
    assert job["error"]["message"] == (f"kohya is not set up for SDXL: {alone.parent / 'sdxl_train_network.py'} "
                                       "does not exist.")
    assert "sdxl_train_network.py beside train_network.py" in job["error"]["hint"]
    assert not job_paths(cfg, job["id"]).trainer_log.exists()  # refused before kohya was started


async def test_a_broken_bigg_tokenizer_folder_is_refused_up_front(start_daemon, tmp_path: Path) -> None:
    cfg = sdxl_config(tmp_path)
    (tmp_path / "tokenizers" / BIGG_TOKENIZER_FOLDER).mkdir()  # e.g. a copy that was interrupted
    client = await start_daemon(cfg)
    job = await wait_for_state(client, await submit(client, cfg, SDXL), {"done", "error"})
    assert job["state"] == "error" and job["error"]["kind"] == "tokenizer_missing"
    assert job["error"]["message"].startswith("SDXL's tokenizers are not ready: ")
    assert f"{tmp_path / 'tokenizers' / BIGG_TOKENIZER_FOLDER} lacks vocab.json (missing)" in job["error"]["message"]
    assert job["error"]["hint"].startswith(f"Delete {tmp_path / 'tokenizers' / BIGG_TOKENIZER_FOLDER}")
    assert not job_paths(cfg, job["id"]).trainer_log.exists()


async def test_sd1_jobs_do_not_need_the_sdxl_tokenizer(start_daemon, tmp_path: Path) -> None:
    cfg = sdxl_config(tmp_path)
    client = await start_daemon(cfg)
    sd1 = replace(SDXL, arch="sd1", cache_text_encoder_outputs=False, gradient_checkpointing=False)
    job = await wait_for_state(client, await submit(client, cfg, sd1, model="sd-test.safetensors"), {"done", "error"})
    assert job["state"] == "done", job["error"]
    assert not (tmp_path / "tokenizers" / BIGG_TOKENIZER_FOLDER).exists()
    lines = await job_log(client, job["id"])
    assert any(line.startswith("training SD 1.x with train_network.py on the CPU:") for line in lines)


@pytest.mark.parametrize(
    ("model", "arch", "found", "wanted"),
    [("xl-test.safetensors", "sd1", "SDXL", "SD 1.x"), ("sd-test.safetensors", "sdxl", "SD 1.x", "SDXL")],
)
async def test_a_model_of_the_other_family_is_refused_before_kohya_loads_it(
        start_daemon, tmp_path: Path, model: str, arch: str, found: str, wanted: str) -> None:
    cfg = sdxl_config(tmp_path)
    client = await start_daemon(cfg)
    job = await wait_for_state(client, await submit(client, cfg, replace(SDXL, arch=arch), model=model),
                               {"done", "error"})
    assert job["state"] == "error" and job["error"]["kind"] == "model_incompatible"
    assert job["error"]["message"] == f"{model} is an {found} model, but the job was set up for {wanted}."
    assert not job_paths(cfg, job["id"]).trainer_log.exists()


async def test_fp8_without_mixed_precision_is_refused_before_the_start_up(start_daemon, tmp_path: Path) -> None:
    cfg = sdxl_config(tmp_path)
    client = await start_daemon(cfg)
    job = await wait_for_state(client, await submit(client, cfg, replace(SDXL, fp8_base=True)), {"done", "error"})
    assert job["state"] == "error" and job["error"]["kind"] == "bad_arguments"
    assert "fp8_base needs mixed_precision fp16 or bf16, not no" in job["error"]["message"]
    assert not job_paths(cfg, job["id"]).trainer_log.exists()
