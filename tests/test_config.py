"""Config: defaults written on first start, path expansion, one clear message per bad key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon.config import DEFAULT_PORT, ConfigError, expand_path, load_or_create, parse_config, update_config_file
from tests.helpers import REPO

TOKEN = "x" * 20


def test_first_start_writes_a_working_default(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "config.yaml"
    config, used, created = load_or_create(path)
    assert created and used == path and path.is_file()
    assert config.host == "127.0.0.1" and config.port == DEFAULT_PORT
    assert config.port not in (9000, 7860, 8188, 8000, 8080)
    assert len(config.token) >= 32
    saved = yaml.safe_load(path.read_text())
    assert saved["token"] == config.token  # generated once, kept
    again, _, created_again = load_or_create(path)
    assert not created_again and again.token == config.token


def test_missing_token_is_generated_and_saved(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("port: 9200\n")
    config, _, _ = load_or_create(path)
    assert len(config.token) >= 32
    assert yaml.safe_load(path.read_text()) == {"port": 9200, "token": config.token}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"port": 9000}, "port"),
        ({"port": 7860}, "port"),
        ({"port": "abc"}, "port"),
        ({"allow_cpu": "yes"}, "allow_cpu"),
        ({"allowed_origins": "http://x"}, "allowed_origins"),
        ({"colour": "blue"}, "colour"),
        ({"kohya": {"scriptpath": "x"}}, "kohya.scriptpath"),
        ({"kohya": {"extra_args": "--foo"}}, "kohya.extra_args"),
        ({"kohya": {"python": 3}}, "kohya.python"),
        ({"token": "short"}, "token"),
    ],
)
def test_bad_settings_name_the_key(raw: dict, key: str) -> None:
    raw = {"token": TOKEN, **raw}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=Path("/cfg"))
    assert info.value.key == key
    assert key in str(info.value)


def test_paths_expand_home_vars_and_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_ROOT", "/srv/ed")
    assert expand_path("$LORA_ROOT/models", None) == Path("/srv/ed/models")
    assert expand_path("${LORA_ROOT}/models", None) == Path("/srv/ed/models")
    assert expand_path("%LORA_ROOT%/models", None) == Path("/srv/ed/models")
    assert expand_path("~/x", None) == Path(os.path.expanduser("~")) / "x"
    assert expand_path("sub/dir", tmp_path) == tmp_path / "sub" / "dir"
    config = parse_config({"token": TOKEN, "ed_lora_dir": "lora", "kohya": {"script_path": "sd/train_network.py"}},
                          base_dir=tmp_path)
    assert config.ed_lora_dir == tmp_path / "lora"
    assert config.kohya.workspace == tmp_path / "sd"  # defaults to the script's folder


def test_update_merges_the_kohya_section(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    update_config_file(path, {"port": 9300, "kohya": {"python": "/venv/bin/python"}})
    update_config_file(path, {"kohya": {"script_path": "/sd/train_network.py"}})
    data = yaml.safe_load(path.read_text())
    assert data["port"] == 9300
    assert data["kohya"]["python"] == "/venv/bin/python"
    assert data["kohya"]["script_path"] == "/sd/train_network.py"
    assert data["token"]


def test_cli_exits_2_with_one_message_on_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"token: {TOKEN}\nport: 7860\n")
    done = subprocess.run([sys.executable, "-m", "daemon", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "port" in done.stderr and "Traceback" not in done.stderr


def test_cli_starts_on_a_default_config_and_answers_health(tmp_path: Path) -> None:
    import time
    import urllib.request

    from tests.helpers import free_port

    port = free_port()
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"), "XDG_DATA_HOME": str(tmp_path / "xdg-data")}
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                    body = resp.read().decode()
                    break
            except OSError:
                time.sleep(0.1)
        assert body is not None and '"ok"' in body
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "Wrote a default config to" in out
    assert (tmp_path / "xdg-config" / "ed-character-lora" / "config.yaml").is_file()
    assert f"http://127.0.0.1:{port}" in out
