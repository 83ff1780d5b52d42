"""Publishing: only a real kohya LoRA gets in, under a fresh name, never seen half-written."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from daemon.pipeline.publish import PublishError, lora_id, publish, slugify, verify_lora


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
