"""install_plugin.py --tokenizer-cache also readies SDXL's second tokenizer, from the CLIP-L files already there."""

from __future__ import annotations

from pathlib import Path

from daemon.config import load_config
from daemon.pipeline.clip_tokenizer import BIGG_TOKENIZER_FOLDER, TOKENIZER_FILES, TOKENIZER_FOLDER
from daemon.pipeline.env_check import check_tokenizer
from tests.test_install_plugin import install, linux_ed, snapshot
from tests.tokenizer_files import write_tokenizer


def test_tokenizer_cache_makes_the_sdxl_tokenizer_and_a_dry_run_does_not(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "ed")
    cfg = tmp_path / "daemon" / "config.yaml"
    cache = tmp_path / "offline" / "tokenizers"
    clip = write_tokenizer(cache / TOKENIZER_FOLDER)
    bigg = cache / BIGG_TOKENIZER_FOLDER
    before = snapshot(cache)
    rc, out = install(ed, cfg, "--tokenizer-cache", cache, "--dry-run")
    assert rc == 0 and f"SDXL tokenizer: would make {bigg} from {TOKENIZER_FOLDER} (the same files)" in out
    assert snapshot(cache) == before
    rc, out = install(ed, cfg, "--tokenizer-cache", cache)
    assert rc == 0 and f"SDXL tokenizer: made {bigg} from {TOKENIZER_FOLDER} (the same files)" in out
    assert all((bigg / name).read_bytes() == (clip / name).read_bytes() for name in TOKENIZER_FILES)
    config = load_config(cfg)
    assert check_tokenizer(config, arch="sdxl", environ={}, reach=lambda *a: "unreachable").ok  # the daemon agrees
    rc, out = install(ed, cfg, "--tokenizer-cache", cache)
    assert rc == 0 and f"SDXL tokenizer: {bigg}\n" in out and "Nothing to change" in out


def test_a_broken_sdxl_tokenizer_is_reported_and_left_alone(tmp_path: Path) -> None:
    cache = tmp_path / "tokenizers"
    write_tokenizer(cache / TOKENIZER_FOLDER)
    (cache / BIGG_TOKENIZER_FOLDER).mkdir()
    rc, out = install(linux_ed(tmp_path / "ed"), tmp_path / "config.yaml", "--tokenizer-cache", cache)
    assert rc == 0  # SD 1.x training does not need it
    assert f"SDXL tokenizer: {cache / BIGG_TOKENIZER_FOLDER} lacks vocab.json (missing)" in out
    assert "delete it and run this again" in out
    assert list((cache / BIGG_TOKENIZER_FOLDER).iterdir()) == []
