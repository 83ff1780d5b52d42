"""Publishing: only a real kohya LoRA gets in, under a fresh name, never seen half-written."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from daemon.pipeline.publish import (
    PublishError,
    lora_arch,
    lora_id,
    publish,
    slugify,
    verify_lora,
)
from daemon.safetensors_header import read_header
from tests.helpers import REPO


def lora(path: Path, *, alpha: bool = True, prefix: str = "lora_unet_down_blocks_0_attentions_0_proj_in") -> Path:
    tensors = {
        f"{prefix}.lora_down.weight": np.zeros((4, 8), dtype=np.float16),
        f"{prefix}.lora_up.weight": np.zeros((8, 4), dtype=np.float16),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 8), dtype=np.float16),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.zeros((8, 4), dtype=np.float16),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": np.array(2.0, dtype=np.float16),
    }
    if alpha:
        tensors[f"{prefix}.alpha"] = np.array(2.0, dtype=np.float16)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def test_verify_accepts_kohya_layout(tmp_path: Path) -> None:
    summary = verify_lora(lora(tmp_path / "a.safetensors"))
    assert (summary.unet_modules, summary.te_modules, summary.alphas) == (1, 1, 2)
    assert summary.metadata["ss_network_module"] == "networks.lora"


def test_verify_refuses_missing_alpha_peft_keys_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="alpha"):
        verify_lora(lora(tmp_path / "a.safetensors", alpha=False))
    peft = tmp_path / "peft.safetensors"
    save_file({"unet.down.lora_A.weight": np.zeros((2, 2), dtype=np.float16)}, str(peft))
    with pytest.raises(PublishError, match="no kohya LoRA"):
        verify_lora(peft)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(PublishError, match="cannot be read"):
        verify_lora(junk)


def test_verify_reads_the_header_like_safetensors_does(tmp_path: Path) -> None:
    path = lora(tmp_path / "a.safetensors")
    keys, metadata = read_header(path)
    with safe_open(str(path), framework="numpy") as fh:
        assert sorted(keys) == sorted(fh.keys()) and metadata == fh.metadata()


@pytest.mark.parametrize("cut", [1, 100, 300])
def test_verify_refuses_a_file_cut_short_while_saving(tmp_path: Path, cut: int) -> None:
    full = lora(tmp_path / "a.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(full[:-cut])
    with pytest.raises(PublishError, match="cannot be read as safetensors"):
        verify_lora(path)
    path.write_bytes(full + b"\0")  # trailing bytes are not a safetensors file either
    with pytest.raises(PublishError, match="should end at byte"):
        verify_lora(path)


@pytest.mark.parametrize("raw", [b"", b"\x05\x00", b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
                                 b"\x04\x00\x00\x00\x00\x00\x00\x00\xff\xfe{}"])
def test_verify_refuses_garbage_headers(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(raw)
    with pytest.raises(PublishError, match="cannot be read as safetensors"):
        verify_lora(path)


def test_verifying_a_lora_does_not_import_numpy(tmp_path: Path) -> None:
    """numpy costs the daemon ~16 MB of memory for its lifetime; reading a header needs none of it."""
    path = lora(tmp_path / "a.safetensors")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import daemon.__main__, daemon.web.app\n"
        "from daemon.pipeline.publish import verify_lora\n"
        f"summary = verify_lora(Path({str(path)!r}))\n"
        "assert summary.unet_modules == 1, summary\n"
        "print('numpy' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_publish_never_overwrites_and_leaves_no_temp_files(tmp_path: Path) -> None:
    src = lora(tmp_path / "src.safetensors")
    dest = tmp_path / "lora"
    dest.mkdir()
    (dest / "Hero.safetensors").write_bytes(b"somebody else's LoRA")
    first = publish(src, dest, "Hero")
    second = publish(src, dest, "Hero")
    assert (first.name, second.name) == ("Hero-2.safetensors", "Hero-3.safetensors")
    assert (dest / "Hero.safetensors").read_bytes() == b"somebody else's LoRA"
    assert first.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["Hero-2.safetensors", "Hero-3.safetensors", "Hero.safetensors"]
    assert lora_id(second, dest) == "Hero-3"


def test_concurrent_publishes_get_distinct_names(tmp_path: Path) -> None:
    src = lora(tmp_path / "src.safetensors")
    dest = tmp_path / "lora"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(publish(src, dest, "Same"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p.name for p in results}) == 6
    assert not [p for p in dest.iterdir() if p.suffix != ".safetensors"]


def test_publish_reports_an_unwritable_folder(tmp_path: Path) -> None:
    src = lora(tmp_path / "src.safetensors")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PublishError, match="Could not write"):
        publish(src, blocker / "lora", "Hero")


@pytest.mark.parametrize(("name", "slug"), [("Mira Blue", "Mira_Blue"), ("a/../b", "a_b"), ("  ", "lora"),
                                            ("x" * 80, "x" * 64), ("Zoë-1_ok", "Zo_-1_ok")])
def test_slugify_makes_safe_stems(name: str, slug: str) -> None:
    assert slugify(name) == slug


# --- SDXL LoRAs, shaped like the real ones (shared/kohya-logs/*/<name>.inspect.json) -------------------------

LOGS_DIR = Path(os.environ.get("KOHYA_LOGS_DIR", REPO.parent / "shared" / "kohya-logs"))
# kohya's networks.lora (no conv_dim) puts a module on every Linear layer of each Transformer2DModel: proj_in,
# proj_out and, per transformer block, attn1/attn2 q k v out and the two feed-forward layers.
_BLOCK = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k", "attn2_to_v",
          "attn2_to_out_0", "ff_net_0_proj", "ff_net_2")
# SDXL's U-Net in SGM names, with each attention's depth: 2 at 640 channels, 10 at 1280.
_SDXL_ATTENTIONS = (("input_blocks_4_1", 2), ("input_blocks_5_1", 2), ("input_blocks_7_1", 10),
                    ("input_blocks_8_1", 10), ("middle_block_1", 10), ("output_blocks_0_1", 10),
                    ("output_blocks_1_1", 10), ("output_blocks_2_1", 10), ("output_blocks_3_1", 2),
                    ("output_blocks_4_1", 2), ("output_blocks_5_1", 2))
# SD 1.x's in diffusers names, one transformer block each.
_SD1_ATTENTIONS = (
    *((f"down_blocks_{b}_attentions_{a}", 1) for b in range(3) for a in range(2)),
    ("mid_block_attentions_0", 1),
    *((f"up_blocks_{b}_attentions_{a}", 1) for b in (1, 2, 3) for a in range(3)),
)
_TE_LAYER = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def unet_modules(attentions: tuple[tuple[str, int], ...]) -> list[str]:
    names: list[str] = []
    for attention, depth in attentions:
        names += [f"lora_unet_{attention}_proj_in", f"lora_unet_{attention}_proj_out"]
        names += [f"lora_unet_{attention}_transformer_blocks_{i}_{layer}" for i in range(depth) for layer in _BLOCK]
    return names


def te_modules(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}_text_model_encoder_layers_{i}_{layer}" for i in range(layers) for layer in _TE_LAYER]


def recorded_lora(inspect: Path, path: Path, *, metadata: bool = True) -> tuple[Path, dict[str, Any]]:
    """A LoRA with the recorded file's keys and header (tiny tensors), from its inspect.json."""
    record = json.loads(inspect.read_text())
    with_te = record["lora_te_keys"] > 0
    if inspect.parent.parent.name == "cpu-sdxl":  # CLIP-L has 12 layers, OpenCLIP bigG 32
        modules = unet_modules(_SDXL_ATTENTIONS) + (te_modules("lora_te1", 12) + te_modules("lora_te2", 32)) * with_te
    else:
        modules = unet_modules(_SD1_ATTENTIONS) + te_modules("lora_te", 12) * with_te
    tensors: dict[str, np.ndarray] = {}
    for module in modules:
        tensors[f"{module}.alpha"] = np.array(1.0, dtype=np.float16)
        tensors[f"{module}.lora_down.weight"] = np.zeros((4, 8), dtype=np.float16)
        tensors[f"{module}.lora_up.weight"] = np.zeros((8, 4), dtype=np.float16)
    save_file(tensors, str(path), metadata=record["metadata"] if metadata else None)
    # the same layout as the recorded file, or the test would prove nothing about real LoRAs
    keys, _ = read_header(path)
    counted: dict[str, int] = {}
    for key in keys:
        prefix = "_".join(key.split("_")[:2])
        counted[prefix] = counted.get(prefix, 0) + 1
    assert len(keys) == record["tensor_count"]
    assert counted.get("lora_unet", 0) == record["lora_unet_keys"]
    assert len(keys) - counted.get("lora_unet", 0) == record["lora_te_keys"]
    assert counted == record.get("key_prefixes", counted)  # recorded for the SDXL runs
    assert sum(key.endswith(".alpha") for key in keys) == record["alpha_keys"]
    first = record["first_keys"]  # a list, or its repr in older records
    assert set(first if isinstance(first, list) else ast.literal_eval(first)) <= set(keys)
    assert set(record["example_alpha"]) <= set(keys)
    return path, record


def recorded(group: str) -> list[object]:
    found = sorted((LOGS_DIR / group).glob("*/*.inspect.json"))
    if not found:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no recorded LoRAs in {LOGS_DIR / group}"))]
    return [pytest.param(path, id=f"{path.parent.name}/{path.name}") for path in found]


@pytest.mark.parametrize("inspect", recorded("cpu-sdxl"))
def test_verify_accepts_real_sdxl_loras_and_says_sdxl(tmp_path: Path, inspect: Path) -> None:
    path, record = recorded_lora(inspect, tmp_path / "sdxl.safetensors")
    summary = verify_lora(path, expected_arch="sdxl")
    assert (summary.arch, summary.arch_label) == ("sdxl", "SDXL")
    assert summary.tensors == record["tensor_count"] and summary.alphas == record["alpha_keys"]
    if record["lora_te_keys"]:  # run 03: both text encoders trained too (72 + 192 modules)
        assert (summary.unet_modules, summary.te_modules, summary.unet_only) == (722, 264, False)
    else:  # U-Net only: 722 modules, no lora_te* at all
        assert (summary.unet_modules, summary.te_modules, summary.unet_only) == (722, 0, True)
    assert summary.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert summary.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # the keys alone say SDXL: a LoRA saved without a header is still recognised
    bare, _ = recorded_lora(inspect, tmp_path / "bare.safetensors", metadata=False)
    assert verify_lora(bare).arch == "sdxl"
    with pytest.raises(PublishError, match=r"LoRA for SDXL models, but the job trained on an SD 1\.x model"):
        verify_lora(path, expected_arch="sd1")


@pytest.mark.parametrize("inspect", recorded("cpu"))
def test_verify_says_sd1_for_real_sd1_loras(tmp_path: Path, inspect: Path) -> None:
    path, record = recorded_lora(inspect, tmp_path / "sd1.safetensors")
    summary = verify_lora(path, expected_arch="sd1")
    assert (summary.arch, summary.arch_label) == ("sd1", "SD 1.x")
    assert (summary.unet_modules, summary.te_modules) == (192, 72 if record["lora_te_keys"] else 0)
    with pytest.raises(PublishError, match=r"LoRA for SD 1\.x models, but the job trained on an SDXL model"):
        verify_lora(path, expected_arch="sdxl")
    # without a header the SD 1.x and 2.x names are the same: unknown, and not refused for it
    bare, _ = recorded_lora(inspect, tmp_path / "bare.safetensors", metadata=False)
    assert verify_lora(bare, expected_arch="sdxl").arch == "unknown"


@pytest.mark.parametrize(("metadata", "arch"), [
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora", "ss_base_model_version": "sd_v2"}, "sd2"),
    ({"ss_base_model_version": "sd_v1"}, "sd1"),
    ({"ss_base_model_version": "flux1"}, "unknown"),
    ({}, "unknown"),
])
def test_lora_arch_reads_kohyas_header(metadata: dict[str, str], arch: str) -> None:
    assert lora_arch(["lora_unet_down_blocks_0_attentions_0_proj_in"], metadata) == arch
    # SGM U-Net names or two text encoders are SDXL's whatever the header says
    assert lora_arch(["lora_unet_output_blocks_5_1_proj_out"], metadata) == "sdxl"
    assert lora_arch(["lora_te2_text_model_encoder_layers_0_mlp_fc1"], metadata) == "sdxl"
