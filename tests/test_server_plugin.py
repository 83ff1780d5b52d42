"""The ED server plugin, imported the way Easy Diffusion imports it, inside a FastAPI app like ED's.

A stand-in `easydiffusion` package provides what the plugin touches in ED (`easydiffusion.server.server_api`,
a FastAPI app; `easydiffusion.app.ROOT_DIR / MODELS_DIR`; `easydiffusion.model_manager.get_model_dirs`), and
`load_ed_server_plugins` repeats ED's `app.load_server_plugins()`: `plugins/server` appended to sys.path,
every `*_plugin.py` imported with importlib, exceptions logged and swallowed.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.helpers import REPO, free_port

PLUGIN_SRC = REPO / "ed_plugin" / "server" / "character_lora_plugin.py"
MODULE = "character_lora_plugin"


# --------------------------------------------------------------------------------------------- a tiny ED


FAKE_ED_MODULES = {
    "easydiffusion/__init__.py": "",
    "easydiffusion/app.py": """
        import os
        SD_DIR = os.environ["FAKE_ED_SD_DIR"]
        ROOT_DIR = os.path.abspath(os.path.join(SD_DIR, ".."))
        MODELS_DIR = os.path.abspath(os.path.join(ROOT_DIR, "models"))
        USER_SERVER_PLUGINS_DIR = os.path.join(ROOT_DIR, "plugins", "server")
    """,
    "easydiffusion/server.py": """
        from fastapi import FastAPI
        server_api = FastAPI()

        @server_api.get("/get/{key:path}")
        def read_web_data(key: str = None):
            return {"key": key}
    """,
    "easydiffusion/model_manager/__init__.py": """
        import os
        from easydiffusion import app
        ALTERNATE_FOLDER_NAMES = {"lora": "Lora", "stable-diffusion": "Stable-diffusion"}

        def get_model_dirs(model_type, base_dir=None):
            base_dir = base_dir or app.MODELS_DIR
            dirs = [os.path.join(base_dir, model_type)]
            alt = os.path.join(base_dir, ALTERNATE_FOLDER_NAMES.get(model_type, model_type))
            if alt != dirs[0] and os.path.isdir(alt):
                dirs.append(alt)
            return dirs
    """,
}


@dataclass
class FakeEd:
    root: Path
    ui_dir: Path
    plugins_dir: Path
    cfg: Path

    def write_settings(self, **settings: Any) -> Path:
        base = {
            "daemon_config": str(self.cfg),
            "daemon_python": sys.executable,
            "daemon_workdir": str(REPO),
            "daemon_log": str(self.cfg.parent / "ed-autostart.log"),
            "autostart": False,
            "ed_root": str(self.root),
            "ed_models_dir": str(self.root / "models"),
        }
        base.update(settings)
        path = self.plugins_dir / f"{MODULE}.json"
        path.write_text(json.dumps(base))
        return path

    def write_daemon_config(self, **values: Any) -> None:
        raw = {
            "host": "127.0.0.1",
            "port": free_port(),
            "token": "plugin-test-token-0123456789",
            "data_dir": str(self.cfg.parent / "data"),
            "ed_lora_dir": str(self.root / "models" / "lora"),
            "ed_models_dir": str(self.root / "models"),
            "allowed_origins": ["http://localhost:9000", "http://127.0.0.1:9000"],
        }
        raw.update(values)
        self.cfg.parent.mkdir(parents=True, exist_ok=True)
        self.cfg.write_text(yaml.safe_dump(raw))

    @property
    def daemon_port(self) -> int:
        return int(yaml.safe_load(self.cfg.read_text())["port"])


def _drop_modules() -> None:
    for name in list(sys.modules):
        if name == MODULE or name == "easydiffusion" or name.startswith("easydiffusion."):
            del sys.modules[name]


@pytest.fixture
def fake_ed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeEd]:
    root = tmp_path / "easy-diffusion"
    ui_dir = root / "ui"
    for rel, code in FAKE_ED_MODULES.items():
        path = ui_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
    (root / "stable-diffusion").mkdir(parents=True)
    for kind in ("lora", "stable-diffusion"):
        (root / "models" / kind).mkdir(parents=True)
    plugins = root / "plugins" / "server"
    plugins.mkdir(parents=True)
    shutil.copy(PLUGIN_SRC, plugins / PLUGIN_SRC.name)
    monkeypatch.setenv("FAKE_ED_SD_DIR", str(root / "stable-diffusion"))
    monkeypatch.syspath_prepend(str(ui_dir))
    _drop_modules()
    ed = FakeEd(root, ui_dir, plugins, tmp_path / "daemon" / "config.yaml")
    yield ed
    _drop_modules()
    if str(plugins) in sys.path:
        sys.path.remove(str(plugins))


def load_ed_server_plugins(plugins_dir: Path) -> dict[str, ModuleType]:
    """ED's app.load_server_plugins(), step by step."""
    log = logging.getLogger("easydiffusion")
    if str(plugins_dir) not in sys.path:
        sys.path.append(str(plugins_dir))
    loaded = {}
    for file in os.listdir(plugins_dir):
        path = plugins_dir / file
        if (not path.is_dir() and not file.endswith("_plugin.py")) or (path.is_dir() and not file.endswith("_plugin")):
            continue
        try:
            loaded[file] = importlib.import_module(file.replace(".py", ""))
        except Exception:
            log.warning("Error while loading a server plugin", exc_info=True)
    return loaded


def start_ed(ed: FakeEd) -> tuple[Any, ModuleType]:
    with warnings.catch_warnings():  # starlette's own deprecation notice about httpx
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from easydiffusion import app as ed_app
    from easydiffusion.server import server_api

    assert str(ed.root) == ed_app.ROOT_DIR
    started = time.monotonic()
    modules = load_ed_server_plugins(ed.plugins_dir)
    assert time.monotonic() - started < 2.0, "importing the plugin must not block ED's start-up"
    return TestClient(server_api), modules[PLUGIN_SRC.name]


def wait_for(predicate: Any, timeout: float = 30.0, step: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return json.loads(resp.read())["status"] == "ok"
    except OSError:
        return False


def stop_process_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + 15
    while time.monotonic() < end:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------- route


def test_info_route_answers_with_daemon_url_token_and_ed_folders(fake_ed: FakeEd) -> None:
    fake_ed.write_daemon_config(port=9555)
    fake_ed.write_settings()
    client, _plugin = start_ed(fake_ed)

    resp = client.get("/character-lora/info")
    assert resp.status_code == 200
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert body["daemon"]["url"] == "http://127.0.0.1:9555"
    assert body["daemon"]["token"] == "plugin-test-token-0123456789"
    assert body["daemon"]["running"] is False
    assert body["daemon"]["autostart"] is False
    assert body["daemon"]["config_path"] == str(fake_ed.cfg)
    assert body["daemon"]["start_command"] == f"{sys.executable} -m daemon --config {fake_ed.cfg}"
    assert body["ed"]["source"] == "easydiffusion"
    assert body["ed"]["root"] == str(fake_ed.root)
    assert body["ed"]["models_dir"] == str(fake_ed.root / "models")
    assert body["ed"]["lora_dirs"] == [str(fake_ed.root / "models" / "lora")]
    assert body["problems"] == []
    # ED's catch-all /get/{key} is untouched (our route is not under /get/)
    assert client.get("/get/models").json() == {"key": "models"}


def test_info_reads_eds_models_dir_at_request_time(fake_ed: FakeEd) -> None:
    """app.init() replaces MODELS_DIR from config.yaml after the plugin may have been imported."""
    fake_ed.write_daemon_config()
    fake_ed.write_settings()
    client, _ = start_ed(fake_ed)
    from easydiffusion import app as ed_app

    elsewhere = fake_ed.root.parent / "other-models"
    (elsewhere / "Lora").mkdir(parents=True)
    ed_app.MODELS_DIR = str(elsewhere)
    body = client.get("/character-lora/info").json()
    assert body["ed"]["models_dir"] == str(elsewhere)
    assert body["ed"]["lora_dirs"] == [str(elsewhere / "lora"), str(elsewhere / "Lora")]
    # the daemon still writes to the old folder: the page is told, with the fix
    assert len(body["problems"]) == 1
    assert "Easy Diffusion reads them from" in body["problems"][0]["error"]
    assert "install_plugin.py" in body["problems"][0]["fix"]


def test_missing_settings_or_config_still_answers_with_a_fix(fake_ed: FakeEd, caplog: pytest.LogCaptureFixture) -> None:
    client, _ = start_ed(fake_ed)  # no settings file at all
    body = client.get("/character-lora/info").json()
    assert body["daemon"]["token"] is None and body["daemon"]["can_start"] is False
    assert "settings file" in body["problems"][0]["error"] and "install_plugin.py" in body["problems"][0]["fix"]

    fake_ed.write_settings()  # settings, but no daemon config yet
    body = client.get("/character-lora/info").json()
    assert "does not exist yet" in body["problems"][0]["error"]


def test_import_outside_ed_adds_nothing_and_does_not_fail() -> None:
    sys.modules.pop("easydiffusion", None)
    spec = importlib.util.spec_from_file_location("_standalone_plugin", PLUGIN_SRC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build_info("/nonexistent/settings.json", probe=False)["problems"]


# --------------------------------------------------------------------------------------------- daemon start-up


def test_autostart_starts_the_daemon_detached_and_only_once(fake_ed: FakeEd, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ed.write_daemon_config()
    fake_ed.write_settings(autostart=True)
    # ED exports PYTHONPATH for its own env; the daemon must not inherit it
    monkeypatch.setenv("PYTHONPATH", "/ed/installer_files/env/lib/python3.9/site-packages")
    client, plugin = start_ed(fake_ed)
    port = fake_ed.daemon_port
    pid = None
    try:
        state = wait_for(lambda: plugin.start_state() if plugin.start_state().get("pid") else None)
        pid = state["pid"]
        wait_for(lambda: health(port), timeout=60)
        assert os.getsid(pid) == pid != os.getsid(0), "the daemon runs in its own session"
        wait_for(lambda: plugin.start_state()["state"] == "running")
        body = client.get("/character-lora/info").json()
        assert body["daemon"]["running"] is True
        assert body["daemon"]["start"]["state"] == "running"
        environ = Path(f"/proc/{pid}/environ")
        if environ.exists():
            env = dict(x.split("=", 1) for x in environ.read_bytes().decode().split("\0") if "=" in x)
            assert env["PYTHONPATH"] == str(REPO)

        # ED restarts (the plugin is imported again): the daemon is already running, nothing new starts
        _drop_modules()
        client2, plugin2 = start_ed(fake_ed)
        wait_for(lambda: plugin2.start_state()["state"] == "already_running")
        assert plugin2.start_state()["pid"] is None

        # a POST /start on demand says the same
        resp = client2.post("/character-lora/start")
        assert resp.status_code == 200 and resp.json()["start"]["state"] == "already_running"
    finally:
        if pid:
            stop_process_group(pid)
    assert "Character LoRA daemon" in (fake_ed.cfg.parent / "ed-autostart.log").read_text()


def test_start_on_demand_when_autostart_is_off(fake_ed: FakeEd) -> None:
    fake_ed.write_daemon_config()
    fake_ed.write_settings(autostart=False)
    client, plugin = start_ed(fake_ed)
    time.sleep(0.3)
    assert plugin.start_state()["state"] == "idle"
    assert not health(fake_ed.daemon_port)
    resp = client.post("/character-lora/start")
    assert resp.status_code == 200
    pid = resp.json()["start"]["pid"]
    try:
        assert resp.json()["start"]["state"] == "starting"
        wait_for(lambda: health(fake_ed.daemon_port), timeout=60)
    finally:
        stop_process_group(pid)


def test_a_crashing_daemon_is_reported_and_ed_keeps_running(fake_ed: FakeEd, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    workdir = tmp_path / "broken"
    (workdir / "daemon").mkdir(parents=True)
    (workdir / "daemon" / "__init__.py").write_text("")
    (workdir / "daemon" / "__main__.py").write_text("import sys\nprint('daemon boom', flush=True)\nsys.exit(3)\n")
    fake_ed.write_daemon_config()
    fake_ed.write_settings(autostart=True, daemon_workdir=str(workdir))
    caplog.set_level(logging.INFO, logger="easydiffusion")
    client, plugin = start_ed(fake_ed)
    state = wait_for(lambda: plugin.start_state() if plugin.start_state()["state"] == "exited" else None)
    assert state["exit_code"] == 3
    assert "exited with code 3" in state["error"] and "ed-autostart.log" in state["error"]
    assert "daemon boom" in Path(state["log"]).read_text()
    body = client.get("/character-lora/info").json()  # ED still serves
    assert body["daemon"]["start"]["state"] == "exited"
    assert any("exited with code 3" in r.getMessage() for r in caplog.records)


def test_bad_daemon_python_is_logged_not_raised(fake_ed: FakeEd, caplog: pytest.LogCaptureFixture) -> None:
    fake_ed.write_daemon_config()
    fake_ed.write_settings(autostart=True, daemon_python=str(fake_ed.root / "no" / "python"))
    caplog.set_level(logging.INFO, logger="easydiffusion")
    client, plugin = start_ed(fake_ed)
    wait_for(lambda: plugin.start_state()["state"] == "failed")
    assert "does not exist" in plugin.start_state()["error"]
    assert any("--daemon-python" in r.getMessage() for r in caplog.records)
    resp = client.post("/character-lora/start")
    assert resp.status_code == 500 and resp.json()["start"]["state"] == "failed"
    assert client.get("/character-lora/info").status_code == 200


def test_detach_flags() -> None:
    spec = importlib.util.spec_from_file_location("_flags_plugin", PLUGIN_SRC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if os.name == "nt":
        flags = module._detach_kwargs()["creationflags"]
        assert flags & subprocess.DETACHED_PROCESS and flags & subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        assert module._detach_kwargs() == {"start_new_session": True}


# --------------------------------------------------------------------------------------------- ED's Python


def test_plugin_source_is_python38_and_stdlib_plus_fastapi() -> None:
    source = PLUGIN_SRC.read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    allowed = set(sys.stdlib_module_names) | {"fastapi", "easydiffusion", "yaml", "ruamel"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed, f"{name} is not available in ED's Python"
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if Path(ruff).exists():
        proc = subprocess.run([ruff, "check", "--no-cache", "--target-version", "py38", str(PLUGIN_SRC)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    py38 = shutil.which("python3.8")
    if py38:
        proc = subprocess.run([py38, "-c", f"import ast,sys; ast.parse(open({str(PLUGIN_SRC)!r}).read())"],
                              capture_output=True, text=True)
        if proc.returncode == 0 or "SyntaxError" in proc.stderr:
            assert proc.returncode == 0, proc.stderr


def test_fallback_yaml_reader_without_yaml_libraries() -> None:
    spec = importlib.util.spec_from_file_location("_yaml_plugin", PLUGIN_SRC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = textwrap.dedent("""
        host: 127.0.0.1
        port: 9131  # comment
        token: 'abc-def_0123456789'
        allowed_origins:
        - http://localhost:9000
        - "http://127.0.0.1:9000"
        kohya:
          script_path: null
        allow_cpu: false
    """)
    data = module._fallback_yaml(text)
    assert data["host"] == "127.0.0.1" and data["port"] == 9131 and data["token"] == "abc-def_0123456789"
    assert data["allowed_origins"] == ["http://localhost:9000", "http://127.0.0.1:9000"]
    assert data["allow_cpu"] is False


# --------------------------------------------------------------------------------------------- lifecycle


def _health_body(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return dict(json.loads(resp.read()))
    except OSError:
        return None


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _auth(token: str = "plugin-test-token-0123456789") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_leftover_daemon_of_another_config_is_named_not_taken_for_ours(fake_ed: FakeEd, tmp_path: Path) -> None:
    """A daemon of another config (its own token and data folder) holds the port: /info says what it is and how
    to fix it, /start does not call it ours, /stop leaves it alone; once it is gone ours starts and is ours."""
    fake_ed.write_daemon_config()
    fake_ed.write_settings()
    port = fake_ed.daemon_port
    other_cfg = tmp_path / "other" / "config.yaml"
    other_cfg.parent.mkdir()
    other_cfg.write_text(yaml.safe_dump({"port": port, "token": "another-token-0123456789abc",
                                         "data_dir": str(tmp_path / "other" / "data")}))
    client, plugin = start_ed(fake_ed)
    with (tmp_path / "leftover.log").open("wb") as out:
        leftover = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(other_cfg)], cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    ours_pid = None
    try:
        wait_for(lambda: health(port), timeout=60)
        body = client.get("/character-lora/info").json()
        assert body["daemon"]["running"] is True and body["daemon"]["ours"] is False
        assert body["daemon"]["pid"] == leftover.pid
        [problem] = body["problems"]
        assert "leftover of another configuration" in problem["error"]
        assert f"process {leftover.pid}" in problem["error"] and str(other_cfg) in problem["error"]
        assert str(fake_ed.cfg) in problem["error"]
        assert f"end process {leftover.pid}" in problem["fix"] and f"another port in {fake_ed.cfg}" in problem["fix"]

        resp = client.post("/character-lora/start")
        assert resp.json()["start"]["state"] == "port_taken"
        assert "leftover" in resp.json()["start"]["error"]
        resp = client.post("/character-lora/stop", headers=_auth())
        assert resp.status_code == 409 and "leftover" in resp.json()["error"]
        time.sleep(0.3)
        assert leftover.poll() is None and health(port)

        # the leftover stopped (with its own token): our daemon starts on the port and is recognised as ours
        req = urllib.request.Request(f"http://127.0.0.1:{port}/shutdown", method="POST", data=b"",
                                     headers=_auth("another-token-0123456789abc"))
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 202
        assert leftover.wait(15) == 0
        resp = client.post("/character-lora/start")
        ours_pid = resp.json()["start"]["pid"]
        wait_for(lambda: plugin.start_state()["state"] == "running", timeout=60)
        body = client.get("/character-lora/info").json()
        assert body["daemon"]["ours"] is True and body["problems"] == []
        assert body["daemon"]["pid"] == _health_body(port)["pid"]
    finally:
        stop_process_group(leftover.pid)
        leftover.wait(15)
        if ours_pid:
            stop_process_group(ours_pid)


def test_stop_and_restart_routes_need_the_token_and_wait_for_the_process(fake_ed: FakeEd) -> None:
    fake_ed.write_daemon_config()
    fake_ed.write_settings()
    port = fake_ed.daemon_port
    client, plugin = start_ed(fake_ed)
    pids: list[int] = []
    try:
        # not running: stop says so, restart just starts it
        resp = client.post("/character-lora/stop", headers=_auth())
        assert resp.status_code == 200 and resp.json()["stopped"] is False
        assert "was not running" in resp.json()["message"]
        resp = client.post("/character-lora/restart", headers=_auth())
        assert resp.status_code == 200, resp.json()
        assert resp.json()["start"]["state"] == "running"
        first = _health_body(port)
        assert first is not None
        pids.append(first["pid"])

        for headers in ({}, _auth("wrong-token-0123456789abcdef"), {"Authorization": "Basic abc"}):
            for action in ("stop", "restart"):
                resp = client.post(f"/character-lora/{action}", headers=headers)
                assert resp.status_code == 401 and "token" in resp.json()["error"]
        assert _health_body(port) == first

        # restart: the old process has exited before the new one starts (the data folder lock is free)
        resp = client.post("/character-lora/restart", headers=_auth())
        assert resp.status_code == 200, resp.json()
        assert resp.json()["stopped"] is True and resp.json()["start"]["state"] == "running"
        second = _health_body(port)
        assert second is not None and second["pid"] != first["pid"]
        pids.append(second["pid"])
        assert _pid_gone(first["pid"])
        assert "Character LoRA daemon stopped." in (fake_ed.cfg.parent / "ed-autostart.log").read_text()

        resp = client.post("/character-lora/stop", headers=_auth())
        assert resp.status_code == 200 and resp.json() == {"stopped": True, "running": False, "pid": second["pid"]}
        assert _health_body(port) is None and _pid_gone(second["pid"])
        assert client.get("/character-lora/info").json()["daemon"]["running"] is False
        # a stop the user asked for is no failure: the banner must not say "the daemon exited with code 0"
        wait_for(lambda: plugin.start_state()["exit_code"] == 0)
        assert plugin.start_state()["state"] == "stopped" and plugin.start_state()["error"] is None
    finally:
        for pid in pids:
            stop_process_group(pid)
