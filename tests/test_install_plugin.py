"""install_plugin.py against temporary folders laid out like real Easy Diffusion installs."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import install_plugin
from daemon.config import load_config
from daemon.pipeline.env_check import check_tokenizer
from tests.helpers import free_port
from tests.tokenizer_files import write_hub_cache, write_tokenizer

UI_FILE = "plugins/ui/character-lora.plugin.js"
SERVER_FILE = "plugins/server/character_lora_plugin.py"
SETTINGS_FILE = "plugins/server/character_lora_plugin.json"
MODULES_DIR = "plugins/ui/character-lora"
# the tab's ES modules, in the order the installer lists them (sorted by path)
MODULE_FILES = sorted(f"{MODULES_DIR}/{p.relative_to(install_plugin.UI_ASSETS_SRC).as_posix()}"
                      for p in install_plugin.UI_ASSETS_SRC.rglob("*.js"))


# --------------------------------------------------------------------------------------------- layouts


def linux_ed(root: Path, *, config: dict | None = None, started: bool = True) -> Path:
    """The Linux/macOS zip (easy-diffusion/), optionally after a first start (models/, plugins/, ui/)."""
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "on_env_start.sh").write_text("#!/bin/bash\n# ED launcher\n")
    (root / "scripts" / "config.yaml.sample").write_text("net:\n  listen_port: 9000\n")
    (root / "start.sh").write_text("#!/bin/bash\n")
    if started:
        (root / "installer_files" / "env" / "bin").mkdir(parents=True)
        (root / "ui" / "easydiffusion").mkdir(parents=True)
        (root / "ui" / "easydiffusion" / "app.py").write_text("# ED's own file\n")
        for kind in ("stable-diffusion", "lora", "vae"):
            (root / "models" / kind).mkdir(parents=True)
        (root / "plugins" / "ui").mkdir(parents=True)
        (root / "plugins" / "server").mkdir(parents=True)
        (root / "bucket").mkdir()
    if config is not None:
        (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def windows_ed(root: Path, *, config: dict | None = None) -> Path:
    """C:\\EasyDiffusion as the NSIS installer leaves it after a first start."""
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "on_env_start.bat").write_text("@echo off\r\n")
    (root / "Start Stable Diffusion UI.cmd").write_text("@echo off\r\n")
    (root / "installer_files" / "env").mkdir(parents=True)
    (root / "installer_files" / "env" / "python.exe").write_bytes(b"MZ")
    (root / "profile" / ".cache").mkdir(parents=True)
    for kind in ("stable-diffusion", "lora"):
        (root / "models" / kind).mkdir(parents=True)
        (root / "models" / kind / f"Place your {kind} model files here.txt").write_text("")
    (root / "plugins" / "ui").mkdir(parents=True)
    (root / "plugins" / "server").mkdir(parents=True)
    if config is not None:
        (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def snapshot(*roots: Path) -> dict[str, tuple[str, bytes | None, int]]:
    """Every file and folder under the roots: kind, content, mtime (so 'changes nothing' is checked strictly)."""
    out: dict[str, tuple[str, bytes | None, int]] = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            st = p.stat()
            out[str(p)] = ("dir", None, 0) if p.is_dir() else ("file", p.read_bytes(), st.st_mtime_ns)
    return out


def run(*args: str | Path, candidates: list[Path] | None = None) -> tuple[int, str]:
    out = io.StringIO()
    rc = install_plugin.main([str(a) for a in args], out=out, candidates=candidates)
    return rc, out.getvalue()


def install(ed: Path, cfg: Path, *extra: str) -> tuple[int, str]:
    return run("--ed-root", ed, "--daemon-python", sys.executable, "--daemon-config", cfg, *extra)


# --------------------------------------------------------------------------------------------- install


def test_linux_root_without_config_yaml_uses_root_models(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "easy-diffusion")
    cfg = tmp_path / "daemon" / "config.yaml"
    rc, out = install(ed, cfg)
    assert rc == 0, out

    repo = install_plugin.REPO
    assert (ed / UI_FILE).read_bytes() == (repo / "ed_plugin/ui/character-lora.plugin.js").read_bytes()
    assert (ed / SERVER_FILE).read_bytes() == (repo / "ed_plugin/server/character_lora_plugin.py").read_bytes()
    settings = json.loads((ed / SETTINGS_FILE).read_text())
    assert settings["daemon_config"] == str(cfg)
    assert settings["daemon_python"] == str(Path(sys.executable).absolute())
    assert settings["daemon_workdir"] == str(repo)
    assert settings["autostart"] is True
    assert settings["installed"]["files"] == [UI_FILE, *MODULE_FILES, SERVER_FILE, SETTINGS_FILE]

    config = load_config(cfg)  # the daemon itself accepts what was written
    assert config.ed_lora_dir == ed / "models" / "lora"
    assert config.ed_models_dir == ed / "models"
    assert len(config.token) >= 16
    assert "http://localhost:9000" in config.allowed_origins
    assert "Restart Easy Diffusion" in out


def test_linux_root_with_models_dir_in_config_yaml(tmp_path: Path) -> None:
    models = tmp_path / "big-disk" / "sd-models"
    ed = linux_ed(tmp_path / "easy-diffusion", config={"models_dir": str(models), "net": {"listen_port": 9100}})
    cfg = tmp_path / "daemon.yaml"
    rc, out = install(ed, cfg)
    assert rc == 0, out
    raw = yaml.safe_load(cfg.read_text())
    assert raw["ed_lora_dir"] == str(models / "lora")
    assert raw["ed_models_dir"] == str(models)
    # ED listens on 9100: that origin is allowed too, the defaults stay
    assert raw["allowed_origins"] == [
        "http://localhost:9000", "http://127.0.0.1:9000", "http://localhost:9100", "http://127.0.0.1:9100",
    ]
    assert "config.yaml models_dir" in out


def test_windows_root_with_and_without_models_dir(tmp_path: Path) -> None:
    ed = windows_ed(tmp_path / "EasyDiffusion", config={"net": {"listen_port": 9000}, "models_dir": None})
    cfg = tmp_path / "AppData" / "config.yaml"
    rc, out = install(ed, cfg)
    assert rc == 0, out
    assert yaml.safe_load(cfg.read_text())["ed_lora_dir"] == str(ed / "models" / "lora")
    assert (ed / UI_FILE).is_file() and (ed / SERVER_FILE).is_file()

    other = tmp_path / "D-drive" / "models"
    ed2 = windows_ed(tmp_path / "EasyDiffusion2", config={"models_dir": str(other)})
    cfg2 = tmp_path / "AppData2" / "config.yaml"
    rc, out = install(ed2, cfg2)
    assert rc == 0, out
    assert yaml.safe_load(cfg2.read_text())["ed_lora_dir"] == str(other / "lora")


def test_relative_models_dir_is_resolved_like_ed_does(tmp_path: Path) -> None:
    # ED runs with its working directory in <root>/stable-diffusion
    ed = linux_ed(tmp_path / "ed", config={"models_dir": "../my-models"})
    info = install_plugin.read_ed_config(ed)
    assert info.models_dir == (ed / "my-models").resolve()


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "easy-diffusion", config={"net": {"listen_port": 9000}})
    cfg = tmp_path / "daemon" / "config.yaml"
    assert install(ed, cfg)[0] == 0
    before = snapshot(ed, cfg.parent)
    rc, out = install(ed, cfg)
    assert rc == 0
    assert snapshot(ed, cfg.parent) == before
    assert "Nothing to change" in out


def test_existing_daemon_config_is_merged_not_replaced(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "ed")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "port": 9555,
        "token": "an-existing-token-0123456789",
        "allowed_origins": ["http://localhost:9000", "http://my-ed.lan:9000"],
        "kohya": {"script_path": "/opt/sd-scripts/train_network.py", "python": "/opt/sd-scripts/venv/bin/python"},
    }))
    assert install(ed, cfg)[0] == 0
    raw = yaml.safe_load(cfg.read_text())
    assert raw["port"] == 9555
    assert raw["token"] == "an-existing-token-0123456789"
    assert raw["kohya"]["script_path"] == "/opt/sd-scripts/train_network.py"
    assert raw["allowed_origins"] == ["http://localhost:9000", "http://my-ed.lan:9000", "http://127.0.0.1:9000"]
    assert raw["ed_lora_dir"] == str(ed / "models" / "lora")


def test_never_touches_ed_files(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "ed", config={"net": {"listen_port": 9000}, "models_dir": str(tmp_path / "m")})
    cfg = tmp_path / "config.yaml"
    before = {k: v for k, v in snapshot(ed).items() if "/plugins/" not in k}
    assert install(ed, cfg)[0] == 0
    after = {k: v for k, v in snapshot(ed).items() if "/plugins/" not in k}
    assert after == before


def test_no_autostart_and_dry_run(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "ed")
    cfg = tmp_path / "config.yaml"
    before = snapshot(ed)
    rc, out = install(ed, cfg, "--dry-run")
    assert rc == 0
    assert snapshot(ed) == before and not cfg.exists()
    assert "Dry run" in out and "write" in out
    assert install(ed, cfg, "--no-autostart")[0] == 0
    assert json.loads((ed / SETTINGS_FILE).read_text())["autostart"] is False
    # switching it back is a change the second run makes
    rc, out = install(ed, cfg)
    assert json.loads((ed / SETTINGS_FILE).read_text())["autostart"] is True


def test_fresh_zip_without_plugin_folders(tmp_path: Path) -> None:
    """ED creates plugins/ on its first start; before that the installer creates the folders itself."""
    ed = linux_ed(tmp_path / "easy-diffusion", started=False)
    (ed / "models").mkdir()  # the user made it, ED did not start yet
    cfg = tmp_path / "config.yaml"
    before = snapshot(ed)
    rc, out = install(ed, cfg)
    assert rc == 0, out
    settings = json.loads((ed / SETTINGS_FILE).read_text())
    assert settings["installed"]["created_dirs"] == ["plugins", "plugins/server", "plugins/ui", MODULES_DIR,
                                                     f"{MODULES_DIR}/views"]
    assert install(ed, cfg)[1].count("Nothing to change") == 1
    rc, out = run("--ed-root", ed, "--uninstall")
    assert rc == 0
    assert snapshot(ed) == before


# --------------------------------------------------------------------------------------------- uninstall


def test_uninstall_removes_exactly_what_was_installed(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "easy-diffusion", config={"net": {"listen_port": 9000}})
    (ed / "plugins" / "ui" / "someone-else.plugin.js").write_text("// another plugin\n")
    (ed / "plugins" / "server" / "other_plugin.py").write_text("# another server plugin\n")
    cfg = tmp_path / "daemon" / "config.yaml"
    before = snapshot(ed)
    assert install(ed, cfg)[0] == 0
    # ED imported the server plugins at start: byte code for ours and for the other one
    cache = ed / "plugins" / "server" / "__pycache__"
    cache.mkdir()
    (cache / "character_lora_plugin.cpython-39.pyc").write_bytes(b"\x00")
    (cache / "other_plugin.cpython-39.pyc").write_bytes(b"\x00")
    before_cache = snapshot(ed)
    del before_cache[str(cache / "character_lora_plugin.cpython-39.pyc")]

    rc, out = run("--ed-root", ed, "--uninstall", "--dry-run")
    assert rc == 0 and "would be removed" in out
    assert (ed / UI_FILE).exists()

    rc, out = run("--ed-root", ed, "--uninstall")
    assert rc == 0, out
    after = snapshot(ed)
    for rel in (UI_FILE, SERVER_FILE, SETTINGS_FILE):
        assert str(ed / rel) not in after
    ours = (UI_FILE, SERVER_FILE, SETTINGS_FILE)
    assert after == {k: v for k, v in before_cache.items()
                     if not k.endswith(ours) and not k.startswith(str(ed / MODULES_DIR))}
    assert {k: v for k, v in after.items() if "__pycache__" not in k} == before
    assert cfg.is_file()  # the daemon's own config stays (token, kohya settings)
    assert "kept" in out

    rc, out = run("--ed-root", ed, "--uninstall")
    assert rc == 0 and "Nothing to remove" in out


def test_uninstall_removes_our_pycache_folder_when_it_held_only_ours(tmp_path: Path) -> None:
    ed = windows_ed(tmp_path / "EasyDiffusion")
    cfg = tmp_path / "config.yaml"
    before = snapshot(ed)
    assert install(ed, cfg)[0] == 0
    cache = ed / "plugins" / "server" / "__pycache__"
    cache.mkdir()
    (cache / "character_lora_plugin.cpython-38.pyc").write_bytes(b"\x00")
    assert run("--ed-root", ed, "--uninstall")[0] == 0
    assert snapshot(ed) == before


# --------------------------------------------------------------------------------------------- finding ED, errors


def test_finds_ed_in_the_usual_places(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ed = linux_ed(home / "easy-diffusion")
    cands = install_plugin.candidate_roots(home=home, platform="linux", environ={})
    assert ed in cands
    rc, out = run("--daemon-python", sys.executable, "--daemon-config", tmp_path / "c.yaml", "--dry-run",
                  candidates=cands)
    assert rc == 0, out
    assert f"Easy Diffusion: {ed}" in out


def test_windows_candidates_include_the_installer_default() -> None:
    cands = [str(c) for c in install_plugin.candidate_roots(
        home=Path("/users/me"), platform="win32", environ={"SystemDrive": "C:", "USERPROFILE": "/users/me"})]
    assert any(c.startswith("C:\\") and c.endswith("EasyDiffusion") for c in cands)
    assert any(c.endswith("stable-diffusion-ui") for c in cands)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing", "is not a folder"),
        ("not-ed", "does not look like an Easy Diffusion folder"),
    ],
)
def test_bad_ed_root_is_one_clear_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str,
                                            expected: str) -> None:
    root = tmp_path / "somewhere"
    if setup == "not-ed":
        (root / "models").mkdir(parents=True)
    rc, _ = run("--ed-root", root, "--daemon-config", tmp_path / "c.yaml")
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("error: ") and expected in err and "--ed-root" in err
    assert err.count("\n") == 0


def test_not_found_and_ambiguous(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = run("--daemon-config", tmp_path / "c.yaml", candidates=[tmp_path / "nope"])
    assert rc == 1
    assert "not found in the usual folders; pass its folder with --ed-root" in capsys.readouterr().err
    a = linux_ed(tmp_path / "a")
    b = windows_ed(tmp_path / "b")
    rc, _ = run("--daemon-config", tmp_path / "c.yaml", candidates=[a, b])
    assert rc == 1
    err = capsys.readouterr().err
    assert "several Easy Diffusion folders" in err and str(a) in err and str(b) in err


def test_bad_daemon_python_and_bad_ed_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ed = linux_ed(tmp_path / "ed")
    rc, _ = run("--ed-root", ed, "--daemon-python", tmp_path / "no-python", "--daemon-config", tmp_path / "c.yaml")
    assert rc == 1
    assert "--daemon-python" in capsys.readouterr().err
    (ed / "config.yaml").write_text("net: [unclosed\n")
    rc, _ = install(ed, tmp_path / "c.yaml")
    assert rc == 1
    err = capsys.readouterr().err
    assert "config.yaml cannot be read" in err and err.count("\n") == 1


def test_runs_as_a_script_from_any_folder(tmp_path: Path) -> None:
    """`python install_plugin.py ...` with the daemon venv's python, from the repo root or elsewhere."""
    ed = linux_ed(tmp_path / "ed")
    script = install_plugin.REPO / "install_plugin.py"
    for cwd in (install_plugin.REPO, tmp_path):
        proc = subprocess.run(
            [sys.executable, str(script), "--ed-root", str(ed), "--daemon-python", sys.executable,
             "--daemon-config", str(tmp_path / "c.yaml"), "--dry-run"],
            cwd=cwd, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "Dry run" in proc.stdout
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--uninstall" in proc.stdout and "--dry-run" in proc.stdout


def test_kohya_option_sets_the_sd_scripts_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ed = linux_ed(tmp_path / "ed")
    cfg = tmp_path / "config.yaml"
    sd_scripts = tmp_path / "sd-scripts"
    (sd_scripts / "venv" / ("Scripts" if sys.platform == "win32" else "bin")).mkdir(parents=True)
    (sd_scripts / "train_network.py").write_text("# kohya\n")
    venv_py = install_plugin.venv_python(sd_scripts / "venv")
    venv_py.write_text("")
    assert install(ed, cfg, "--kohya", sd_scripts)[0] == 0
    kohya = yaml.safe_load(cfg.read_text())["kohya"]
    assert kohya["script_path"] == str(sd_scripts / "train_network.py")
    assert kohya["workspace"] == str(sd_scripts)
    assert kohya["python"] == str(venv_py)
    assert kohya["accelerate_bin"] == "accelerate"  # the rest of the section stays
    before = snapshot(cfg.parent)
    assert "Nothing to change" in install(ed, cfg, "--kohya", sd_scripts / "train_network.py")[1]
    assert snapshot(cfg.parent) == before

    rc, _ = install(ed, cfg, "--kohya", tmp_path / "not-sd-scripts")
    assert rc == 1 and "no train_network.py" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- CPU-only, offline


def test_allow_cpu_option_sets_it_once_and_dry_run_shows_it(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "ed")
    cfg = tmp_path / "daemon" / "config.yaml"
    assert install(ed, cfg)[0] == 0
    assert load_config(cfg).allow_cpu is False
    before = snapshot(cfg.parent)
    rc, out = install(ed, cfg, "--allow-cpu", "--dry-run")
    assert rc == 0 and '"allow_cpu": true' in out and "Dry run: 1 change(s)" in out
    assert snapshot(cfg.parent) == before
    rc, out = install(ed, cfg, "--allow-cpu")
    assert rc == 0 and '"allow_cpu": true' in out
    assert load_config(cfg).allow_cpu is True  # the daemon reads what was written
    raw = yaml.safe_load(cfg.read_text())
    assert raw["token"] == yaml.safe_load(before[str(cfg)][1])["token"]  # nothing else changed
    before = snapshot(cfg.parent)
    rc, out = install(ed, cfg, "--allow-cpu")
    assert "Nothing to change" in out and snapshot(cfg.parent) == before
    # an install without the option keeps what was chosen before
    assert "Nothing to change" in install(ed, cfg)[1]
    assert load_config(cfg).allow_cpu is True


def test_allow_cpu_on_a_first_install(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "ed")
    cfg = tmp_path / "config.yaml"
    assert install(ed, cfg, "--allow-cpu")[0] == 0
    assert load_config(cfg).allow_cpu is True


def test_tokenizer_cache_option_checks_the_folder_and_sets_it(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "ed")
    cfg = tmp_path / "daemon" / "config.yaml"
    cache = tmp_path / "offline" / "tokenizers"
    write_tokenizer(cache / "openai_clip-vit-large-patch14")
    before = snapshot(ed, cfg.parent)
    rc, out = install(ed, cfg, "--tokenizer-cache", cache, "--dry-run")
    assert rc == 0 and f'"tokenizer_cache_dir": "{cache}"' in out
    assert snapshot(ed, cfg.parent) == before
    rc, out = install(ed, cfg, "--tokenizer-cache", cache)
    assert rc == 0, out
    assert f"Tokenizer: {cache / 'openai_clip-vit-large-patch14'}" in out
    config = load_config(cfg)
    assert config.kohya.tokenizer_cache_dir == cache
    assert check_tokenizer(config, environ={}, reach=lambda *a: "unreachable").ok  # the daemon agrees
    before = snapshot(ed, cfg.parent)
    assert "Nothing to change" in install(ed, cfg, "--tokenizer-cache", cache)[1]
    assert snapshot(ed, cfg.parent) == before
    # naming the tokenizer folder itself is understood: kohya wants its parent
    assert "Nothing to change" in install(ed, cfg, "--tokenizer-cache", cache / "openai_clip-vit-large-patch14")[1]


def test_tokenizer_cache_with_kohya_keeps_both(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "ed")
    cfg = tmp_path / "config.yaml"
    sd_scripts = tmp_path / "sd-scripts"
    sd_scripts.mkdir()
    (sd_scripts / "train_network.py").write_text("# kohya\n")
    cache = tmp_path / "tok"
    write_tokenizer(cache / "openai_clip-vit-large-patch14")
    assert install(ed, cfg, "--kohya", sd_scripts, "--tokenizer-cache", cache, "--allow-cpu")[0] == 0
    raw = yaml.safe_load(cfg.read_text())
    assert raw["kohya"]["script_path"] == str(sd_scripts / "train_network.py")
    assert raw["kohya"]["tokenizer_cache_dir"] == str(cache)
    assert raw["allow_cpu"] is True


def bad_cache(tmp_path: Path, case: str) -> Path:
    cache = tmp_path / "tok"
    folder = cache / "openai_clip-vit-large-patch14"
    if case == "not-a-folder":
        return tmp_path / "nowhere"
    if case == "empty":
        cache.mkdir()
    elif case == "files-loose":
        write_tokenizer(cache)
    elif case == "incomplete":
        write_tokenizer(folder)
        (folder / "merges.txt").unlink()
        (folder / "tokenizer_config.json").write_text("{")
    return cache


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("not-a-folder", "is not a folder; give the folder that holds openai_clip-vit-large-patch14/ with vocab.json, "
                         "merges.txt, tokenizer_config.json, special_tokens_map.json"),
        ("empty", "has no openai_clip-vit-large-patch14 folder; copy vocab.json, merges.txt, tokenizer_config.json, "
                  "special_tokens_map.json of openai/clip-vit-large-patch14 from a computer with internet"),
        ("files-loose", "holds the tokenizer files itself, but kohya looks for them in"),
        ("incomplete", "lacks merges.txt (missing), tokenizer_config.json (not a JSON object; copied only in part?)"),
    ],
)
def test_tokenizer_cache_without_the_files_says_what_is_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, case: str,
        expected: str) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hf-cache"))
    for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    ed = linux_ed(tmp_path / "ed")
    cfg = tmp_path / "config.yaml"
    before = snapshot(ed)
    rc, _ = install(ed, cfg, "--tokenizer-cache", bad_cache(tmp_path, case))
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("error: --tokenizer-cache ") and expected in err and err.count("\n") == 0
    assert snapshot(ed) == before and not cfg.exists()  # nothing was half-installed


def test_tokenizer_cache_error_points_at_the_hf_cache_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    snapshot_dir = write_hub_cache(tmp_path / "hf" / "hub")
    (tmp_path / "tok").mkdir()
    rc, _ = install(linux_ed(tmp_path / "ed"), tmp_path / "config.yaml", "--tokenizer-cache", tmp_path / "tok")
    assert rc == 1
    assert f"from this computer's Hugging Face cache ({snapshot_dir}) into" in capsys.readouterr().err


def test_help_lists_the_set_up_options() -> None:
    proc = subprocess.run([sys.executable, str(install_plugin.REPO / "install_plugin.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "--allow-cpu" in proc.stdout and "--tokenizer-cache DIR" in proc.stdout
# ------------------------------------------------------------------------------- uninstall stops the daemon


def _start_daemon(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(cfg)], cwd=install_plugin.REPO,
                                stdout=out, stderr=subprocess.STDOUT)
    port = int(yaml.safe_load(cfg.read_text())["port"])
    end = time.monotonic() + 60
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the daemon did not start:\n{log.read_text()}")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _daemon_config(path: Path, port: int, name: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"port": port, "token": f"{name}-token-0123456789abcdef",
                                    "data_dir": str(path.parent / "data")}))
    return path


def test_uninstall_stops_the_daemon_it_configured(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "easy-diffusion")
    port = free_port()
    cfg = _daemon_config(tmp_path / "daemon" / "config.yaml", port, "ours")
    assert install(ed, cfg)[0] == 0
    proc = _start_daemon(cfg, tmp_path / "daemon.log")
    try:
        rc, out = run("--ed-root", ed, "--uninstall", "--dry-run")
        assert rc == 0 and f"stop daemon   http://127.0.0.1:{port} (process {proc.pid})" in out
        time.sleep(0.3)
        assert proc.poll() is None  # a dry run stops nothing

        rc, out = run("--ed-root", ed, "--uninstall")
        assert rc == 0, out
        assert f"stopped       the daemon at http://127.0.0.1:{port} (process {proc.pid})" in out
        assert proc.wait(5) == 0  # the installer waited for it: it has already exited
        assert _port_free(port)
        assert "Character LoRA daemon stopped." in (tmp_path / "daemon.log").read_text()
        assert not (ed / SETTINGS_FILE).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_uninstall_says_when_no_daemon_runs_and_leaves_another_configs_daemon_alone(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "easy-diffusion")
    port = free_port()
    cfg = _daemon_config(tmp_path / "daemon" / "config.yaml", port, "ours")
    assert install(ed, cfg)[0] == 0
    other = _daemon_config(tmp_path / "other" / "config.yaml", port, "other")  # a leftover on the same port
    proc = _start_daemon(other, tmp_path / "other.log")
    try:
        rc, out = run("--ed-root", ed, "--uninstall")
        assert rc == 0, out
        assert f"leftover of another configuration (process {proc.pid}, config {other})" in out
        assert "It was left running." in out
        time.sleep(0.3)
        assert proc.poll() is None
        assert not (ed / SETTINGS_FILE).exists()  # the plugin is removed all the same
    finally:
        proc.terminate()
        proc.wait(15)

    assert install(ed, cfg)[0] == 0
    rc, out = run("--ed-root", ed, "--uninstall")
    assert rc == 0 and f"daemon        not running at http://127.0.0.1:{port}" in out
# --------------------------------------------------------------------------------------------- the tab's modules


def test_installs_the_tab_modules_where_the_server_plugin_serves_them(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "easy-diffusion")
    assert install(ed, tmp_path / "c.yaml")[0] == 0
    assert {"plugins/ui/character-lora/main.js", "plugins/ui/character-lora/api.js",
            "plugins/ui/character-lora/socket.js", "plugins/ui/character-lora/store.js"} <= set(MODULE_FILES)
    assert any(f.startswith(f"{MODULES_DIR}/views/") for f in MODULE_FILES)
    for rel in MODULE_FILES:
        src = install_plugin.UI_ASSETS_SRC / rel.removeprefix(MODULES_DIR + "/")
        assert (ed / rel).read_bytes() == src.read_bytes(), rel
    # only the loader is a *.plugin.js: ED runs every such file in plugins/ui as a classic script
    assert sorted(p.name for p in (ed / "plugins" / "ui").rglob("*.plugin.js")) == ["character-lora.plugin.js"]
    # the server plugin's folder for them is the installed one (its ../ui/character-lora)
    plugin_src = (ed / SERVER_FILE).read_text()
    assert 'os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ui", "character-lora")' \
        in plugin_src
    # a module that changes is copied again; one that did not is left alone
    main_js = ed / MODULES_DIR / "main.js"
    main_js.write_text("// stale\n")
    rc, out = install(ed, tmp_path / "c.yaml")
    assert rc == 0, out
    assert f"update        {main_js}\n" in out and f"unchanged     {ed / MODULES_DIR / 'api.js'}\n" in out
    assert main_js.read_bytes() == (install_plugin.UI_ASSETS_SRC / "main.js").read_bytes()


def test_uninstall_removes_the_modules_even_without_the_settings_file(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "easy-diffusion")
    before = snapshot(ed)
    assert install(ed, tmp_path / "c.yaml")[0] == 0
    (ed / SETTINGS_FILE).unlink()  # the manifest is gone: the installer falls back to the files it would copy
    rc, out = run("--ed-root", ed, "--uninstall")
    assert rc == 0, out
    assert not (ed / MODULES_DIR).exists()
    assert snapshot(ed) == before


def test_uninstall_keeps_a_file_the_user_put_in_the_module_folder(tmp_path: Path) -> None:
    ed = linux_ed(tmp_path / "easy-diffusion")
    assert install(ed, tmp_path / "c.yaml")[0] == 0
    mine = ed / MODULES_DIR / "notes.txt"
    mine.write_text("mine\n")
    assert run("--ed-root", ed, "--uninstall")[0] == 0
    assert mine.read_text() == "mine\n"
    assert sorted(p.name for p in (ed / MODULES_DIR).iterdir()) == ["notes.txt"]


def test_missing_entry_module_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    partial = tmp_path / "copy" / "character-lora"
    partial.mkdir(parents=True)
    (partial / "api.js").write_text("export {}\n")
    monkeypatch.setattr(install_plugin, "UI_ASSETS_SRC", partial)
    ed = linux_ed(tmp_path / "easy-diffusion")
    before = snapshot(ed)
    rc, _ = install(ed, tmp_path / "c.yaml")
    assert rc == 1
    err = capsys.readouterr().err
    assert f"{partial / 'main.js'} is missing" in err and err.count("\n") == 1
    assert snapshot(ed) == before
