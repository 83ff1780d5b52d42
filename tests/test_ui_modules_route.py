"""The server plugin's GET /character-lora/ui/<name>: serves the tab's ES modules from the installed folder.

The plugin is installed by install_plugin.py into a fresh ED root and imported from there, so the folder it
serves is the one the installer wrote (<root>/plugins/ui/character-lora/), as inside Easy Diffusion.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import install_plugin

MODULES = sorted(p.relative_to(install_plugin.UI_ASSETS_SRC).as_posix()
                 for p in install_plugin.UI_ASSETS_SRC.rglob("*.js"))


def _install(tmp_path: Path) -> Path:
    ed = tmp_path / "easy-diffusion"
    (ed / "scripts").mkdir(parents=True)
    (ed / "scripts" / "on_env_start.sh").write_text("#!/bin/bash\n")
    for sub in ("models/stable-diffusion", "models/lora", "plugins/ui", "plugins/server"):
        (ed / sub).mkdir(parents=True)
    cfg = tmp_path / "daemon" / "config.yaml"
    rc = install_plugin.main(["--ed-root", str(ed), "--daemon-python", sys.executable, "--daemon-config", str(cfg),
                              "--no-autostart"], out=io.StringIO())
    assert rc == 0
    return ed


def _load(ed: Path) -> ModuleType:
    path = ed / "plugins" / "server" / "character_lora_plugin.py"
    spec = importlib.util.spec_from_file_location(f"_route_test_plugin_{id(ed)}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def installed(tmp_path: Path) -> tuple[Path, ModuleType, Any]:
    from fastapi import FastAPI

    with warnings.catch_warnings():  # starlette's own deprecation notice about httpx
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    ed = _install(tmp_path)
    plugin = _load(ed)
    app = plugin.register_routes(FastAPI(), str(ed / "plugins" / "server" / "character_lora_plugin.json"))
    return ed, plugin, TestClient(app)


def test_the_tab_has_an_entry_module_and_views() -> None:
    assert "main.js" in MODULES and "api.js" in MODULES and "socket.js" in MODULES
    assert all(install_plugin.UI_ASSETS_SRC.joinpath(m).stat().st_size > 0 for m in MODULES)


def test_serves_every_installed_module_as_javascript(installed: tuple[Path, ModuleType, Any]) -> None:
    ed, plugin, client = installed
    assert Path(plugin.UI_MODULES_DIR) == ed / "plugins" / "ui" / "character-lora"
    for name in MODULES:
        resp = client.get(f"/character-lora/ui/{name}")
        assert resp.status_code == 200, name
        # browsers refuse to run a module served with any other MIME type
        assert resp.headers["content-type"] == "text/javascript; charset=utf-8"
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert "no-store" in resp.headers["cache-control"]
        assert resp.content == (install_plugin.UI_ASSETS_SRC / name).read_bytes()


# (name as sent, whether it reaches our route): the client resolves a literal "../" before sending, so ED's
# router answers those; percent-encoded ones arrive decoded at our handler, which must refuse them itself
@pytest.mark.parametrize(("name", "ours"), [
    ("../character_lora_plugin.py", False),
    ("views/../../server/character_lora_plugin.py", False),
    ("main.js/../../../server/character_lora_plugin.json", False),
    ("..%2Fcharacter_lora_plugin.py", True),
    ("%2e%2e/%2e%2e/server/character_lora_plugin.json", True),
    ("..%5C..%5Cserver%5Ccharacter_lora_plugin.json", True),
    ("/etc/passwd", True),
    ("%2Fetc%2Fpasswd", True),
    ("MAIN.JS", True),
    ("main.mjs", True),
    ("missing.js", True),
    ("a/b/c.js", True),
])
def test_refuses_names_outside_the_module_folder(installed: tuple[Path, ModuleType, Any], name: str,
                                                 ours: bool) -> None:
    _ed, _plugin, client = installed
    resp = client.get(f"/character-lora/ui/{name}")
    assert resp.status_code == 404
    assert resp.headers["content-type"].startswith("application/json")
    if ours:
        assert resp.json()["error"].startswith("There is no tab module named ")
    else:
        assert resp.json() == {"detail": "Not Found"}
    assert "daemon_config" not in resp.text and "PLUGIN_VERSION" not in resp.text and "root:" not in resp.text


def test_a_link_out_of_the_folder_is_not_followed(installed: tuple[Path, ModuleType, Any]) -> None:
    ed, plugin, client = installed
    secret = ed / "plugins" / "server" / "character_lora_plugin.json"
    os.symlink(secret, ed / "plugins" / "ui" / "character-lora" / "leak.js")
    resp = client.get("/character-lora/ui/leak.js")
    assert resp.status_code == 404
    assert plugin.ui_module("leak.js")[0] == 404
    assert "daemon_config" not in resp.text


def test_pure_function_checks_the_name_before_touching_the_disk(tmp_path: Path) -> None:
    ed = _install(tmp_path)
    plugin = _load(ed)
    folder = tmp_path / "modules"
    (folder / "views").mkdir(parents=True)
    (folder / "views" / "form.js").write_text("export const x = 1\n")
    status, body, ctype = plugin.ui_module("views/form.js", str(folder))
    assert (status, body, ctype) == (200, b"export const x = 1\n", "text/javascript; charset=utf-8")
    for bad in (None, 3, "", ".js", "views/", "views\\form.js", "views//form.js", "./views/form.js", "views/form.js\n",
                "views/form.js\x00"):
        assert plugin.ui_module(bad, str(folder))[0] == 404
