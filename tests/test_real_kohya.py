"""Opt-in: one real training through the daemon with the real kohya sd-scripts (CPU is fine).

Set, e.g. after `eval "$(bash ../shared/harness/real_kohya.sh env)"`:
    KOHYA_SD=$KH_SD KOHYA_PYTHON=$KH_PY KOHYA_MODEL=$KH_MODEL KOHYA_TOKENIZER_CACHE=$KH_TOK_CACHE
Takes a few minutes on 2 CPU cores (256 px, 6 steps, two aspect-ratio buckets).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiohttp
import pytest
from safetensors import safe_open

from daemon.pipeline.params import TrainParams, total_steps
from daemon.pipeline.runner import job_paths
from tests.conftest import wait_for_state
from tests.helpers import free_port, make_config, picture_bytes

ENV = ("KOHYA_SD", "KOHYA_PYTHON", "KOHYA_MODEL", "KOHYA_TOKENIZER_CACHE")
missing = [name for name in ENV if not os.environ.get(name)]

pytestmark = [
    pytest.mark.real_kohya,
    pytest.mark.skipif(bool(missing), reason=f"real kohya not configured: set {', '.join(missing)} "
                       "(see ../shared/harness/README.md)"),
]


async def test_real_kohya_trains_through_the_daemon(start_daemon, tmp_path: Path) -> None:
    sd = Path(os.environ["KOHYA_SD"])
    gpu = os.environ.get("KOHYA_GPU") == "1"
    cfg = make_config(
        tmp_path,
        port=free_port(),
        base_model=os.environ["KOHYA_MODEL"],
        allow_cpu=not gpu,
        kohya={
            "python": os.environ["KOHYA_PYTHON"],
            "script_path": str(sd / "train_network.py"),
            "workspace": str(sd),
            "tokenizer_cache_dir": os.environ["KOHYA_TOKENIZER_CACHE"],
        },
    )
    client = await start_daemon(cfg)
    ready = await (await client.post("/config/test")).json()
    assert ready["ready"], ready["checks"]
    params = {"resolution": 256, "epochs": 2, "repeats": 1, "batch_size": 4, "network_dim": 4,
              "network_alpha": 2, "save_every_n_epochs": 1, "sample_every_n_epochs": 2}
    # Pictures of two shapes (5 landscape JPEGs, 3 portrait PNGs), so kohya makes two buckets.
    form = aiohttp.FormData()
    form.add_field("name", "Real Run")
    form.add_field("trigger", "sksreal")
    form.add_field("params", json.dumps(params))
    for i in range(8):
        landscape = i < 5
        form.add_field("images", picture_bytes(i, size=(400, 300) if landscape else (300, 400),
                                               fmt="JPEG" if landscape else "PNG"),
                       filename=f"pic{i}.{'jpg' if landscape else 'png'}")
    resp = await client.post("/train", data=form)
    assert resp.status == 202, await resp.text()
    job_id = (await resp.json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"}, timeout=900)
    assert job["state"] == "done", (job["error"], job["logs"][-30:])
    trainer_log = job_paths(cfg, job_id).trainer_log.read_text(encoding="utf-8")
    buckets = [ln.strip() for ln in trainer_log.splitlines() if ln.strip().startswith("bucket ")]
    assert buckets == ["bucket 0: resolution (192, 256), count: 3", "bucket 1: resolution (256, 192), count: 5"]
    assert "bucket_no_upscale: True" in trainer_log
    # No batch mixes buckets: ceil(5/4) + ceil(3/4) = 3 batches per epoch, not ceil(8/4) = 2.
    steps = total_steps(TrainParams.from_json(job["params"]), [5, 3])
    assert steps == 6
    assert job["progress"]["total"] == steps and job["progress"]["step"] == steps
    assert job["progress"]["epoch"] == 2 and job["progress"]["epochs"] == 2
    events = (await (await client.get(f"/jobs/{job_id}/events")).json())["events"]
    assert [e["data"]["file"] for e in events if e["type"] == "checkpoint"] == [
        "Real_Run-000001.safetensors", "Real_Run.safetensors"]
    # kohya's own preview picture, found by the watcher and served
    assert [s["file"][:17] for s in job["samples"]] == ["Real_Run_e000002_"]
    assert [e["data"]["file"] for e in events if e["type"] == "sample"] == [job["samples"][0]["file"]]
    picture = await client.get(job["samples"][0]["url"])
    assert picture.status == 200 and (await picture.read())[:4] == b"\x89PNG"
    with safe_open(job["artifact"], framework="numpy") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
        sample = fh.get_tensor(next(k for k in keys if k.endswith("lora_down.weight")))
    assert sum(k.endswith(".alpha") for k in keys) == 264  # 72 text-encoder + 192 U-Net modules
    assert str(sample.dtype) == "float16"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta.get("modelspec.trigger_phrase") == "sksreal"
