"""Publishing: only a real kohya LoRA gets in, under a fresh name, never seen half-written."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from daemon.pipeline.publish import (
    PublishError,
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
