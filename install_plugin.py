#!/usr/bin/env python3
"""Install the Character LoRA plugins into Easy Diffusion and point the training daemon at ED's folders.

    python install_plugin.py [--ed-root PATH] [--daemon-python PATH] [--daemon-config PATH]
                             [--kohya PATH [--kohya-python PATH]] [--allow-cpu] [--tokenizer-cache DIR]
                             [--no-autostart] [--uninstall] [--dry-run]

Run it with the daemon's Python from the project folder (``.venv/bin/python install_plugin.py`` or
``.venv\\Scripts\\python.exe install_plugin.py``). What it does, in order:

1. finds Easy Diffusion (``--ed-root``, else the usual install folders) and checks the folder is an ED root;
2. reads ED's ``config.yaml`` for ``models_dir`` (default ``<root>/models``) and ``net.listen_port``;
3. copies ``ed_plugin/ui/character-lora.plugin.js`` (the tab's loader) to ``<root>/plugins/ui/``, the tab's ES
   modules ``ed_plugin/ui/character-lora/`` to ``<root>/plugins/ui/character-lora/`` (the server plugin serves
   them under ``/character-lora/ui/``) and ``ed_plugin/server/character_lora_plugin.py`` to ``<root>/plugins/server/``;
4. writes the server plugin's settings, ``<root>/plugins/server/character_lora_plugin.json`` (where the daemon
   config and Python are, whether ED starts the daemon, and the list of what was installed);
5. writes or updates the daemon config: ``ed_lora_dir`` = ``<models_dir>/lora``, ``ed_models_dir`` =
   ``<models_dir>``, ED's address in ``allowed_origins``, a token if there is none, and with ``--kohya`` the
   sd-scripts paths (``kohya.script_path``, ``kohya.workspace``, ``kohya.python``), with ``--allow-cpu``
   ``allow_cpu: true``, and with ``--tokenizer-cache DIR`` ``kohya.tokenizer_cache_dir`` (after checking that
   DIR holds the CLIP tokenizer kohya loads offline; SDXL's second tokenizer is made beside it from the same files
   when it is missing).

It never changes ED's own files. Running it twice changes nothing the second time. ``--uninstall`` stops the
daemon it configured (if it runs and is that config's daemon) and removes exactly the files it installed (the
daemon config is the daemon's and stays). Every failure is one sentence that says how to fix it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent
UI_PLUGIN_SRC = REPO / "ed_plugin" / "ui" / "character-lora.plugin.js"
# the tab's ES modules; the server plugin serves them from <root>/plugins/ui/character-lora/ (its ../ui/character-lora)
UI_ASSETS_SRC = REPO / "ed_plugin" / "ui" / "character-lora"
SERVER_PLUGIN_SRC = REPO / "ed_plugin" / "server" / "character_lora_plugin.py"

UI_PLUGIN_NAME = UI_PLUGIN_SRC.name
UI_ASSETS_NAME = UI_ASSETS_SRC.name
SERVER_PLUGIN_NAME = SERVER_PLUGIN_SRC.name
SETTINGS_NAME = "character_lora_plugin.json"
MODULE_NAME = SERVER_PLUGIN_SRC.stem
SETTINGS_VERSION = 1


class InstallError(Exception):
    """One sentence: what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------- finding ED


def candidate_roots(*, home: Path | None = None, platform: str | None = None,
                    environ: dict[str, str] | None = None) -> list[Path]:
    """The usual places Easy Diffusion is installed, most likely first."""
    home = home if home is not None else Path.home()
    platform = platform or sys.platform
    environ = dict(os.environ) if environ is None else environ
    names = ("EasyDiffusion", "easy-diffusion", "Easy Diffusion", "stable-diffusion-ui")
    out: list[Path] = []
    if platform.startswith("win"):
        drives = [environ.get("SystemDrive", "C:"), "D:", "E:"]
        for drive in dict.fromkeys(drives):
            out += [Path(f"{drive}\\") / n for n in names]
        for var in ("USERPROFILE", "LOCALAPPDATA", "ProgramFiles"):
            if environ.get(var):
                out += [Path(environ[var]) / n for n in names]
        out += [home / n for n in names] + [home / "Desktop" / n for n in names]
        out += [home / "Downloads" / n for n in names]
    else:
        for base in (home, home / "Desktop", home / "Downloads", home / "Applications", home / "apps",
                     home / "opt", Path("/opt"), Path("/Applications")):
            out += [base / n for n in names]
    seen: dict[str, Path] = {}
    for p in out:
        seen.setdefault(str(p).lower() if platform.startswith("win") else str(p), p)
    return list(seen.values())


def looks_like_ed_root(root: Path) -> bool:
    launcher = (
        (root / "scripts" / "on_env_start.sh").is_file()
        or (root / "scripts" / "on_env_start.bat").is_file()
        or (root / "Start Stable Diffusion UI.cmd").is_file()
    )
    body = any(
        p.exists()
        for p in (root / "installer_files", root / "ui" / "easydiffusion", root / "config.yaml", root / "models",
                  root / "sd-ui-files", root / "stable-diffusion")
    )
    return launcher and body


def find_ed_root(given: Path | None, candidates: Iterable[Path] | None = None) -> Path:
    if given is not None:
        root = given.expanduser()
        if not root.is_dir():
            raise InstallError(f"{root} is not a folder; pass the Easy Diffusion folder with --ed-root.")
        root = root.resolve()
        if not looks_like_ed_root(root):
            raise InstallError(
                f"{root} does not look like an Easy Diffusion folder (no scripts/on_env_start.sh or .bat next to "
                "models/ or installer_files/); pass the folder that holds 'Start Stable Diffusion UI.cmd' or "
                "start.sh with --ed-root."
            )
        return root
    found = [c for c in (candidates if candidates is not None else candidate_roots()) if looks_like_ed_root(c)]
    if not found:
        raise InstallError(
            "Easy Diffusion was not found in the usual folders; pass its folder with --ed-root PATH (the one "
            "that holds 'Start Stable Diffusion UI.cmd' or start.sh)."
        )
    if len(found) > 1:
        listed = ", ".join(str(f) for f in found)
        raise InstallError(f"Found several Easy Diffusion folders ({listed}); choose one with --ed-root PATH.")
    return found[0].resolve()


# --------------------------------------------------------------------------------------------- ED config


@dataclass(frozen=True)
class EdInfo:
    root: Path
    models_dir: Path
    models_dir_source: str
    listen_port: int


def read_ed_config(root: Path) -> EdInfo:
    import yaml

    path = root / "config.yaml"
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise InstallError(
                f"Easy Diffusion's {path} cannot be read ({type(exc).__name__}); fix or delete it, start Easy "
                "Diffusion once, then run this again."
            ) from exc
        if isinstance(loaded, dict):
            data = loaded
    models_dir = root / "models"
    source = "default <root>/models"
    raw_models = data.get("models_dir")
    if isinstance(raw_models, str) and raw_models.strip():
        candidate = Path(os.path.expanduser(raw_models.strip()))
        if not candidate.is_absolute():
            # ED runs with its working directory in <root>/stable-diffusion
            candidate = (root / "stable-diffusion" / candidate).resolve()
        models_dir = candidate
        source = "config.yaml models_dir"
    port = 9000
    net = data.get("net")
    if isinstance(net, dict) and isinstance(net.get("listen_port"), int):
        port = net["listen_port"]
    return EdInfo(root=root, models_dir=models_dir, models_dir_source=source, listen_port=port)


# --------------------------------------------------------------------------------------------- daemon side


def venv_python(folder: Path) -> Path:
    if os.name == "nt":
        return folder / "Scripts" / "python.exe"
    return folder / "bin" / "python"


def choose_daemon_python(given: Path | None) -> Path:
    if given is not None:
        py = given.expanduser()
        if not py.is_file():
            raise InstallError(f"--daemon-python {py} does not exist; give the python of the daemon's venv.")
        return py.absolute()
    local = venv_python(REPO / ".venv")
    if local.is_file():
        return local.absolute()
    return Path(sys.executable).absolute()


def check_daemon_python(python: Path) -> None:
    try:
        proc = subprocess.run(
            [str(python), "-c", "import daemon.config, aiohttp"],
            cwd=str(REPO),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{python} could not be run ({exc}); pass a working Python with --daemon-python.") from exc
    if proc.returncode != 0:
        raise InstallError(
            f"{python} cannot import the daemon; install it into that venv first (pip install -e .), or pass "
            "the venv's python with --daemon-python."
        )


def _daemon_module(name: str) -> Any:
    """A module of the daemon package, imported only when needed (the installer runs with any Python)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise InstallError(
            f"This Python cannot import the daemon ({exc}); run the installer with the daemon's venv python "
            "from the project folder, e.g. .venv/bin/python install_plugin.py."
        ) from exc


def _daemon_config_module() -> Any:
    return _daemon_module("daemon.config")


def resolve_kohya(given: Path | None, python: Path | None) -> dict[str, str]:
    """`--kohya` (the sd-scripts folder or its train_network.py) -> the daemon's kohya: settings."""
    if given is None:
        if python is not None:
            raise InstallError("--kohya-python needs --kohya PATH (the sd-scripts folder) as well.")
        return {}
    path = given.expanduser().absolute()
    script = path / "train_network.py" if path.is_dir() else path
    if not script.is_file() or script.name != "train_network.py":
        raise InstallError(
            f"--kohya {path} is not the kohya-ss sd-scripts folder (no train_network.py in it); pass the folder "
            "you cloned sd-scripts into."
        )
    out = {"script_path": str(script), "workspace": str(script.parent)}
    if python is not None:
        py = python.expanduser().absolute()
        if not py.is_file():
            raise InstallError(f"--kohya-python {py} does not exist; give the python of the sd-scripts venv.")
        out["python"] = str(py)
    else:
        for venv in ("venv", ".venv"):
            candidate = venv_python(script.parent / venv)
            if candidate.is_file():
                out["python"] = str(candidate.absolute())
                break
    return out


def _clip_tokenizer_module() -> Any:
    return _daemon_module("daemon.pipeline.clip_tokenizer")


def resolve_tokenizer_cache(given: Path | None) -> str | None:
    """`--tokenizer-cache DIR` -> kohya.tokenizer_cache_dir, once DIR holds every file kohya reads offline."""
    if given is None:
        return None
    ct = _clip_tokenizer_module()
    path = given.expanduser().absolute()
    files = ", ".join(ct.TOKENIZER_FILES)
    if not path.is_dir():
        raise InstallError(f"--tokenizer-cache {path} is not a folder; give the folder that holds "
                           f"{ct.TOKENIZER_FOLDER}/ with {files} (see the README, 'offline').")
    folder = path / ct.TOKENIZER_FOLDER
    if not folder.is_dir() and not ct.missing_files(path):
        if path.name == ct.TOKENIZER_FOLDER:
            return str(path.parent)  # the user named the tokenizer folder itself; kohya wants its parent
        raise InstallError(f"--tokenizer-cache {path} holds the tokenizer files itself, but kohya looks for them "
                           f"in {folder}; move them there and run this again.")
    missing = ct.missing_files(folder)
    if missing:
        snapshot = ct.cached_snapshot(os.environ)
        source = (f"from this computer's Hugging Face cache ({snapshot})" if snapshot else
                  f"of {ct.TOKENIZER_ID} from a computer with internet (see the README, 'offline')")
        if not folder.is_dir():
            raise InstallError(f"--tokenizer-cache {path} has no {ct.TOKENIZER_FOLDER} folder; copy {files} "
                               f"{source} into {folder}.")
        raise InstallError(f"--tokenizer-cache {path}: {folder} lacks {', '.join(missing)}; copy {files} {source} "
                           "into it.")
    return str(path)


def sdxl_tokenizer(cache: Path, *, dry_run: bool) -> str:
    """SDXL's second tokenizer folder in the cache: there, made now from CLIP-L's files, or what is wrong with it.

    The same files serve both (see daemon/pipeline/clip_tokenizer.py, BIGG_TOKENIZER_ID). Not an error when it
    cannot be had: SD 1.x does not need it, and the daemon says so before an SDXL job.
    """
    ct = _clip_tokenizer_module()
    target = cache / ct.BIGG_TOKENIZER_FOLDER
    if target.exists():
        broken = ct.missing_files(target)
        if broken:
            return (f"SDXL tokenizer: {target} lacks {', '.join(broken)}; delete it and run this again "
                    "(SD 1.x training does not need it).")
        return f"SDXL tokenizer: {target}"
    if dry_run:
        return f"SDXL tokenizer: would make {target} from {ct.TOKENIZER_FOLDER} (the same files)"
    ct.derive_bigg(cache)
    return f"SDXL tokenizer: made {target} from {ct.TOKENIZER_FOLDER} (the same files)"


def origins_for_port(port: int) -> list[str]:
    return [f"http://localhost:{port}", f"http://127.0.0.1:{port}"]


def daemon_config_updates(cfg_path: Path, ed: EdInfo, kohya: dict[str, str] | None = None, *,
                          allow_cpu: bool = False) -> dict[str, Any]:
    """The keys to change in the daemon config (empty when it already says all of it)."""
    dc = _daemon_config_module()
    current = dc.read_yaml(cfg_path) if cfg_path.exists() else {}
    want: dict[str, Any] = {
        "ed_lora_dir": str(ed.models_dir / "lora"),
        "ed_models_dir": str(ed.models_dir),
    }
    if allow_cpu:
        want["allow_cpu"] = True
    origins = current.get("allowed_origins")
    if not isinstance(origins, list):
        origins = list(dc.DEFAULT_ORIGINS)
    merged = list(origins) + [o for o in origins_for_port(ed.listen_port) if o not in origins]
    if merged != current.get("allowed_origins"):
        want["allowed_origins"] = merged
    if not current.get("token"):
        import secrets

        want["token"] = secrets.token_urlsafe(32)
    updates = {k: v for k, v in want.items() if current.get(k) != v}
    section = current.get("kohya") if isinstance(current.get("kohya"), dict) else {}
    kohya_changes = {k: v for k, v in (kohya or {}).items() if section.get(k) != v}
    if kohya_changes:
        updates["kohya"] = kohya_changes
    return updates


# --------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    ed: EdInfo
    daemon_python: Path
    daemon_config: Path
    autostart: bool
    files: list[tuple[Path, bytes]] = field(default_factory=list)  # (destination, content)
    dirs: list[Path] = field(default_factory=list)  # folders that do not exist yet
    config_updates: dict[str, Any] = field(default_factory=dict)


def _asset_files() -> list[tuple[str, Path]]:
    if not UI_ASSETS_SRC.is_dir():
        return []
    return sorted(
        (str(p.relative_to(UI_ASSETS_SRC.parent)).replace(os.sep, "/"), p)
        for p in UI_ASSETS_SRC.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def settings_content(plan: Plan, installed: list[str], created_dirs: list[str]) -> bytes:
    settings = {
        "version": SETTINGS_VERSION,
        "daemon_config": str(plan.daemon_config),
        "daemon_python": str(plan.daemon_python),
        "daemon_workdir": str(REPO),
        "daemon_log": str(plan.daemon_config.parent / "ed-autostart.log"),
        "autostart": plan.autostart,
        "ed_root": str(plan.ed.root),
        "ed_models_dir": str(plan.ed.models_dir),
        "installed": {"files": installed, "created_dirs": created_dirs},
    }
    return (json.dumps(settings, indent=2, sort_keys=False) + "\n").encode("utf-8")


def make_plan(ed: EdInfo, daemon_python: Path, daemon_config: Path, autostart: bool,
              kohya: dict[str, str] | None = None, *, allow_cpu: bool = False) -> Plan:
    for src in (UI_PLUGIN_SRC, UI_ASSETS_SRC / "main.js", SERVER_PLUGIN_SRC):
        if not src.is_file():
            raise InstallError(f"{src} is missing; run the installer from a complete copy of the project.")
    plan = Plan(ed=ed, daemon_python=daemon_python, daemon_config=daemon_config, autostart=autostart)
    ui_dir = ed.root / "plugins" / "ui"
    server_dir = ed.root / "plugins" / "server"
    plan.files.append((ui_dir / UI_PLUGIN_NAME, UI_PLUGIN_SRC.read_bytes()))
    for rel, src in _asset_files():
        plan.files.append((ui_dir / rel, src.read_bytes()))
    plan.files.append((server_dir / SERVER_PLUGIN_NAME, SERVER_PLUGIN_SRC.read_bytes()))

    # folders we create (and may remove again on uninstall), outermost first
    previous = _read_settings(ed.root)
    previously_created = set((previous or {}).get("installed", {}).get("created_dirs", []))
    needed: list[Path] = []
    for dest, _ in plan.files:
        for parent in reversed(dest.relative_to(ed.root).parents):
            if str(parent) == ".":
                continue
            path = ed.root / parent
            if path not in needed:
                needed.append(path)
    plan.dirs = [d for d in needed if not d.exists()]
    created = sorted({_rel(ed.root, d) for d in plan.dirs} | (previously_created & {_rel(ed.root, d) for d in needed}))

    installed = [_rel(ed.root, dest) for dest, _ in plan.files] + [_rel(ed.root, server_dir / SETTINGS_NAME)]
    plan.files.append((server_dir / SETTINGS_NAME, settings_content(plan, installed, created)))
    plan.config_updates = daemon_config_updates(daemon_config, ed, kohya, allow_cpu=allow_cpu)
    return plan


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _read_settings(root: Path) -> dict[str, Any] | None:
    path = root / "plugins" / "server" / SETTINGS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------- actions


def _write_if_changed(path: Path, content: bytes) -> bool:
    if path.is_file() and path.read_bytes() == content:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
    return True


def apply_plan(plan: Plan, *, dry_run: bool, out: Any) -> int:
    """Carry out the plan; returns the number of changes (0 = already installed)."""
    changes = 0
    verb = "would" if dry_run else "will"
    for d in plan.dirs:
        print(f"  create folder {d}", file=out)
        changes += 1
        if not dry_run:
            d.mkdir(parents=True, exist_ok=True)
    for dest, content in plan.files:
        same = dest.is_file() and dest.read_bytes() == content
        if same:
            print(f"  unchanged     {dest}", file=out)
            continue
        print(f"  {'update' if dest.exists() else 'write '}        {dest}", file=out)
        changes += 1
        if not dry_run:
            _write_if_changed(dest, content)
    if plan.config_updates:
        shown = {k: ("<new secret>" if k == "token" else v) for k, v in plan.config_updates.items()}
        print(f"  set in daemon config {plan.daemon_config}: {json.dumps(shown)}", file=out)
        changes += 1
        if not dry_run:
            plan.daemon_config.parent.mkdir(parents=True, exist_ok=True)
            _daemon_config_module().update_config_file(plan.daemon_config, plan.config_updates)
    else:
        print(f"  unchanged     {plan.daemon_config}", file=out)
    if changes == 0:
        print("Nothing to change: the plugin is already installed.", file=out)
    elif dry_run:
        print(f"Dry run: {changes} change(s) {verb} be made; nothing was written.", file=out)
    return changes


def _server_plugin_module() -> Any:
    """The server plugin's own code (stdlib only), loaded from the project: one implementation of 'stop the daemon
    this config describes' for the tab's Stop button and for --uninstall. Outside ED its import hooks nothing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_character_lora_server_plugin", SERVER_PLUGIN_SRC)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stop_configured_daemon(cfg_path: str | None, *, dry_run: bool, out: Any) -> None:
    """The daemon ED started survives ED and the plugin's removal: stop it (POST /shutdown with its token), but
    only when it is the one this config describes, never a daemon of another config on the same port."""
    if not cfg_path or not Path(cfg_path).is_file():
        return
    plugin = _server_plugin_module()
    try:
        cfg = plugin.read_daemon_config(cfg_path)
    except Exception as exc:
        print(f"  daemon        cannot read its config {cfg_path} ({exc}); stop the daemon yourself if it runs",
              file=out)
        return
    url, _host = plugin.daemon_address(cfg)
    if dry_run:
        health = plugin.fetch_health(url)
        if health is None:
            print(f"  daemon        not running at {url}", file=out)
        elif plugin.is_ours(health, cfg_path) is False:
            print(f"  daemon        {plugin.foreign_problem(health, url, cfg_path)['error']} It would be left running.",
                  file=out)
        else:
            print(f"  stop daemon   {url} (process {health.get('pid')})", file=out)
        return
    status, body = plugin.stop_daemon(cfg_path, cfg)
    if status == 200 and body.get("stopped"):
        print(f"  stopped       the daemon at {url} (process {body.get('pid')})", file=out)
    elif status == 200:
        print(f"  daemon        not running at {url}", file=out)
    else:
        said = " ".join(part for part in (body.get("error"), body.get("hint")) if part)
        print(f"  daemon        {said} It was left running.", file=out)


def uninstall(root: Path, *, dry_run: bool, out: Any) -> int:
    settings = _read_settings(root)
    if settings is not None:
        stop_configured_daemon(settings.get("daemon_config"), dry_run=dry_run, out=out)
        files = list(settings.get("installed", {}).get("files", []))
        created_dirs = list(settings.get("installed", {}).get("created_dirs", []))
    else:
        files = [f"plugins/ui/{UI_PLUGIN_NAME}", f"plugins/server/{SERVER_PLUGIN_NAME}",
                 f"plugins/server/{SETTINGS_NAME}"] + [f"plugins/ui/{rel}" for rel, _ in _asset_files()]
        created_dirs = []
    # byte code ED's Python wrote when it imported the server plugin
    cache = root / "plugins" / "server" / "__pycache__"
    pyc = sorted(cache.glob(f"{MODULE_NAME}.*.pyc")) if cache.is_dir() else []
    targets = [root / f for f in files] + pyc
    removed = 0
    emptied: set[Path] = set()
    for path in targets:
        if not _inside(root, path) or not path.is_file():
            continue
        print(f"  remove        {path}", file=out)
        removed += 1
        emptied.add(path.parent)
        if not dry_run:
            path.unlink()
    # folders that only we use (the asset folder, __pycache__ if it held only our byte code) and the plugin
    # folders this script created; each only when nothing else is left in it
    candidates = {d for d in emptied if d == cache or UI_ASSETS_NAME in d.relative_to(root).parts}
    candidates |= {root / d for d in created_dirs}
    for d in sorted(candidates, key=lambda p: -len(p.parts)):
        if not d.is_dir() or not _inside(root, d) or d == root:
            continue
        rest = [p for p in d.iterdir() if not (dry_run and (p in targets or p in candidates))]
        if rest:
            continue
        print(f"  remove folder {d}", file=out)
        removed += 1
        if not dry_run:
            d.rmdir()
    if removed == 0:
        print("Nothing to remove: the plugin is not installed here.", file=out)
    elif dry_run:
        print(f"Dry run: {removed} item(s) would be removed; nothing was deleted.", file=out)
    else:
        print("The daemon config was kept (it holds your token and settings); delete it by hand if you wish.",
              file=out)
    return removed


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="install_plugin.py",
        description="Install the 'Train character LoRA' tab and server plugin into Easy Diffusion.",
    )
    p.add_argument("--ed-root", type=Path, help="the Easy Diffusion folder (default: look in the usual places)")
    p.add_argument("--daemon-python", type=Path,
                   help="python of the daemon's venv (default: .venv next to this script, else this python)")
    p.add_argument("--daemon-config", type=Path, help="daemon config file (default: the daemon's per-user config)")
    p.add_argument("--kohya", type=Path, metavar="PATH",
                   help="the kohya-ss sd-scripts folder (sets kohya.script_path/workspace, and kohya.python from its "
                        "venv/ if there is one)")
    p.add_argument("--kohya-python", type=Path, metavar="PATH", help="python of the sd-scripts venv")
    p.add_argument("--allow-cpu", action="store_true",
                   help="let the daemon train on the CPU when there is no CUDA GPU (sets allow_cpu: true; very slow)")
    p.add_argument("--tokenizer-cache", type=Path, metavar="DIR",
                   help="folder holding openai_clip-vit-large-patch14/ (the CLIP tokenizer), so training needs no "
                        "internet (sets kohya.tokenizer_cache_dir; makes SDXL's second tokenizer beside it)")
    p.add_argument("--no-autostart", action="store_true",
                   help="do not let Easy Diffusion start the daemon; you start it yourself")
    p.add_argument("--uninstall", action="store_true", help="remove what this script installed")
    p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, out: Any = None, candidates: Iterable[Path] | None = None) -> int:
    out = out or sys.stdout
    args = parse_args(argv)
    try:
        root = find_ed_root(args.ed_root, candidates)
        print(f"Easy Diffusion: {root}", file=out)
        if args.uninstall:
            uninstall(root, dry_run=args.dry_run, out=out)
            if not args.dry_run:
                print("Restart Easy Diffusion to drop the tab and the server plugin.", file=out)
            return 0
        ed = read_ed_config(root)
        print(f"Models folder: {ed.models_dir} ({ed.models_dir_source})", file=out)
        python = choose_daemon_python(args.daemon_python)
        check_daemon_python(python)
        cfg_path = args.daemon_config.expanduser().absolute() if args.daemon_config else None
        if cfg_path is None:
            cfg_path = Path(_daemon_config_module().default_config_path())
        if cfg_path.exists() and not cfg_path.is_file():
            raise InstallError(f"--daemon-config {cfg_path} is a folder; give the path of a .yaml file.")
        print(f"Daemon: {python} -m daemon --config {cfg_path}", file=out)
        kohya = resolve_kohya(args.kohya, args.kohya_python)
        tokenizer_cache = resolve_tokenizer_cache(args.tokenizer_cache)
        if tokenizer_cache is not None:
            print(f"Tokenizer: {Path(tokenizer_cache) / _clip_tokenizer_module().TOKENIZER_FOLDER}", file=out)
            print(sdxl_tokenizer(Path(tokenizer_cache), dry_run=args.dry_run), file=out)
            kohya["tokenizer_cache_dir"] = tokenizer_cache
        plan = make_plan(ed, python, cfg_path, autostart=not args.no_autostart, kohya=kohya,
                         allow_cpu=args.allow_cpu)
        changes = apply_plan(plan, dry_run=args.dry_run, out=out)
        if changes and not args.dry_run:
            print("Done. Restart Easy Diffusion, then open the 'Train character LoRA' tab.", file=out)
        return 0
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"error: permission denied for {exc.filename}; run the installer as the user who owns "
              "Easy Diffusion's folder.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
