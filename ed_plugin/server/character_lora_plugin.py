"""Character LoRA One-Click: Easy Diffusion server plugin.

Copied by ``install_plugin.py`` to ``<ED root>/plugins/server/character_lora_plugin.py``. Easy Diffusion imports
every ``*_plugin.py`` in that folder at start-up (``app.load_server_plugins``), inside its own Python (3.8 or
3.9, ED's pinned packages). This module therefore uses only the standard library and FastAPI, and keeps to
Python 3.8 syntax.

What it does:

* adds ``GET /character-lora/info`` to ED's FastAPI app. The "Train character LoRA" tab calls it (same
  origin, so no CORS) to learn the daemon's URL and token and ED's models and LoRA folders. The token only
  ever reaches the page through this route.
* adds ``POST /character-lora/start``, which starts the daemon on demand (the banner's "Start daemon").
* adds ``POST /character-lora/stop`` and ``POST /character-lora/restart`` (the tab's Stop and Restart; they need
  ``Authorization: Bearer <daemon token>``, the token ``/info`` hands the tab): the daemon is asked to stop
  (its authenticated ``POST /shutdown``), the plugin waits until its process has exited, and Restart then starts
  it again as the autostart does.
* tells its own daemon from a leftover of another config that holds the port: ``GET /health`` reports an
  instance id (from the daemon's config path) which ``/info`` compares with the one of its own config.
* adds ``GET /character-lora/ui/<name>.js``: the tab's ES modules, which ``install_plugin.py`` copies to
  ``<ED root>/plugins/ui/character-lora/`` (``../ui/character-lora`` from this file). ED's tab loader
  (``plugins/ui/character-lora.plugin.js``) imports ``main.js`` from there. Only lower-case ``name.js`` or
  ``folder/name.js`` inside that folder is served (a link out of it is refused), as JavaScript.
* when the settings say ``"autostart": true``, starts the training daemon (``<daemon venv python> -m daemon
  --config <path>``) in a background thread if ``GET /health`` does not answer. The daemon runs in its own
  session / process group, detached, so a daemon crash does not touch ED and ED exiting does not kill it.

Settings live next to this file in ``character_lora_plugin.json`` (written by ``install_plugin.py``)::

    {
      "daemon_config": "/abs/path/to/daemon/config.yaml",
      "daemon_python": "/abs/path/to/repo/.venv/bin/python",
      "daemon_workdir": "/abs/path/to/repo",
      "daemon_log": "/abs/path/to/daemon/ed-autostart.log",
      "autostart": true,
      "ed_root": "...", "ed_models_dir": "...",            (fallbacks when ED's modules are not importable)
      "installed": {...}                                    (install manifest, used by --uninstall)
    }

Anything that goes wrong is logged; importing this module never raises, so ED always starts.
"""

import hashlib
import hmac
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

PLUGIN_VERSION = "0.1.0"
ROUTE_PREFIX = "/character-lora"
SETTINGS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "character_lora_plugin.json")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9131

# a child of ED's own logger ("easydiffusion"), so the lines show up in ED's console like its own
log = logging.getLogger("easydiffusion.character_lora")

_start_lock = threading.Lock()
_start_state = {"state": "idle", "error": None, "pid": None, "log": None, "at": None, "exit_code": None,
                "stop_requested": False}


# --------------------------------------------------------------------------------------------- settings


def load_settings(path=None):
    """Return (settings dict, problem sentence or None)."""
    path = path or SETTINGS_FILE
    if not os.path.isfile(path):
        return {}, f"The plugin settings file {path} is missing."
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return {}, f"The plugin settings file {path} cannot be read ({e})."
    if not isinstance(data, dict):
        return {}, f"The plugin settings file {path} does not hold a JSON object."
    return data, None


def _parse_scalar(text):
    text = text.strip()
    if not text or text in ("~", "null", "Null", "NULL"):
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in ("'", '"'):
        inner = text[1:-1]
        if text[0] == '"':
            try:
                return json.loads(text)
            except ValueError:
                return inner
        return inner.replace("''", "'")
    if text in ("true", "True", "yes"):
        return True
    if text in ("false", "False", "no"):
        return False
    try:
        return int(text)
    except ValueError:
        pass
    if text.startswith("[") and text.endswith("]"):
        return [_parse_scalar(part) for part in text[1:-1].split(",") if part.strip()]
    return text


def _fallback_yaml(text):
    """Top-level ``key: value`` pairs and ``- item`` lists only: enough for host/port/token/allowed_origins."""
    data = {}
    current_list_key = None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in (" ", "\t", "-"):
            item = line.strip()
            if current_list_key and item.startswith("- "):
                if data.get(current_list_key) is None:
                    data[current_list_key] = []
                if isinstance(data[current_list_key], list):
                    data[current_list_key].append(_parse_scalar(item[2:]))
            continue
        if ":" not in line:
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        if value.strip():
            data[key] = _parse_scalar(value)
            current_list_key = None
        else:
            data[key] = None
            current_list_key = key
    return data


def read_daemon_config(path):
    """Read the daemon's YAML config with whatever YAML library ED's Python has (PyYAML, ruamel.yaml)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        import yaml  # PyYAML: a dependency of ED's diffusers/accelerate

        data = yaml.safe_load(text)
    except ImportError:
        try:
            from ruamel.yaml import YAML  # ED's own config reader

            data = YAML(typ="safe").load(text)
        except ImportError:
            data = _fallback_yaml(text)
    return data if isinstance(data, dict) else {}


def daemon_address(cfg):
    """(url for the browser, host the daemon binds). 0.0.0.0/:: is reached through the loopback address."""
    host = str(cfg.get("host") or DEFAULT_HOST)
    try:
        port = int(cfg.get("port") or DEFAULT_PORT)
    except (TypeError, ValueError):
        port = DEFAULT_PORT
    browser_host = host
    if host in ("0.0.0.0", "::", ""):
        browser_host = "127.0.0.1"
    if ":" in browser_host and not browser_host.startswith("["):
        browser_host = f"[{browser_host}]"
    return f"http://{browser_host}:{port}", host


# --------------------------------------------------------------------------------------------- ED paths


def ed_paths(settings):
    """ED's root, models folder and LoRA folders: from ED itself when running inside it, else the settings."""
    root = settings.get("ed_root")
    models_dir = settings.get("ed_models_dir")
    lora_dirs = None
    sd_dirs = None
    source = "settings"
    app = sys.modules.get("easydiffusion.app")
    if app is not None:
        root = getattr(app, "ROOT_DIR", root)
        # read at call time: app.init() replaces MODELS_DIR with config.yaml's models_dir
        models_dir = getattr(app, "MODELS_DIR", models_dir)
        source = "easydiffusion"
        try:
            from easydiffusion.model_manager import get_model_dirs

            lora_dirs = list(get_model_dirs("lora"))
            sd_dirs = list(get_model_dirs("stable-diffusion"))
        except Exception:  # ED's internals moved: fall back to the documented layout
            pass
    if models_dir and lora_dirs is None:
        lora_dirs = [os.path.join(models_dir, "lora")]
    if models_dir and sd_dirs is None:
        sd_dirs = [os.path.join(models_dir, "stable-diffusion")]
    return {
        "root": root,
        "models_dir": models_dir,
        "lora_dirs": lora_dirs or [],
        "stable_diffusion_dirs": sd_dirs or [],
        "source": source,
    }


def _same_dir(a, b):
    try:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------- daemon


def fetch_health(url, timeout=1.0):
    """The body of ``GET <url>/health`` when a daemon answers ``{"status": "ok"}``, else None."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8") or "{}")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("status") == "ok" else None


def probe_daemon(url, timeout=1.0):
    """True when ``GET <url>/health`` answers ``{"status": "ok"}``."""
    return fetch_health(url, timeout) is not None


def expected_instance(cfg_path):
    """The instance id ``/health`` reports for a daemon started with this config file.

    The same recipe as the daemon's ``daemon/instance_id.py`` (this file cannot import the daemon: it runs in
    ED's Python); tests/test_lifecycle.py checks that both agree."""
    canonical = os.path.normcase(os.path.realpath(os.path.abspath(cfg_path)))
    return hashlib.sha256(("config:" + canonical).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def is_ours(health, cfg_path):
    """True/False when the answering daemon was/was not started with ``cfg_path``; None when nothing answers,
    no config is set, or the daemon is too old to report its instance."""
    if not health or not cfg_path or not health.get("instance"):
        return None
    return health.get("instance") == expected_instance(cfg_path)


def foreign_problem(health, url, cfg_path):
    """The problem sentence for a daemon on our port that belongs to another config."""
    pid = health.get("pid")
    other = health.get("config")
    details = []
    if pid:
        details.append(f"process {pid}")
    if other:
        details.append(f"config {other}")
    what = " ({})".format(", ".join(details)) if details else ""
    stop = f"end process {pid}" if pid else "stop it"
    if other:
        stop += f" or send it POST /shutdown with the token from {other}"
    return {
        "error": f"The daemon answering at {url} is a leftover of another configuration{what}, not the one {cfg_path} "
        "describes, so it refuses this configuration's token.",
        "fix": f"Stop that daemon ({stop}), or set another port in {cfg_path}; then start the daemon again.",
    }


def _child_env(workdir, python):
    """ED exports PYTHONPATH/PYTHONHOME for its own env; the daemon's venv must not inherit them."""
    env = {}
    for key, value in os.environ.items():
        upper = key.upper()
        if upper in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__"):
            continue
        if upper.startswith("CONDA"):
            continue
        env[key] = value
    if workdir:
        env["PYTHONPATH"] = workdir
    bindir = os.path.dirname(os.path.abspath(python))
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _detach_kwargs():
    if os.name == "nt":
        flags = 0
        flags |= getattr(subprocess, "DETACHED_PROCESS", 0x00000008)
        flags |= getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
        return {"creationflags": flags}
    return {"start_new_session": True}


def _set_state(**kw):
    _start_state.update(kw)
    _start_state["at"] = time.time()


def start_state():
    return dict(_start_state)


def spawn_daemon(settings, cfg_url):
    """Start the daemon unless it already answers. Blocking; returns the new start state. Never raises."""
    python = settings.get("daemon_python")
    cfg_path = settings.get("daemon_config")
    workdir = settings.get("daemon_workdir") or None
    log_path = settings.get("daemon_log") or (
        os.path.join(os.path.dirname(cfg_path), "ed-autostart.log") if cfg_path else None
    )
    with _start_lock:
        health = fetch_health(cfg_url)
        if health is not None:
            if is_ours(health, cfg_path) is False:
                _set_state(state="port_taken", error=foreign_problem(health, cfg_url, cfg_path)["error"])
            else:
                _set_state(state="already_running", error=None)
            return start_state()
        if not python or not cfg_path:
            _set_state(state="not_configured", error="daemon_python or daemon_config is not set in the settings.")
            return start_state()
        if not os.path.isfile(python):
            msg = f"The daemon's Python {python} does not exist."
            _set_state(state="failed", error=msg)
            log.error("Character LoRA: %s Re-run install_plugin.py with --daemon-python.", msg)
            return start_state()
        if workdir and not os.path.isdir(workdir):
            msg = f"The daemon folder {workdir} does not exist."
            _set_state(state="failed", error=msg)
            log.error("Character LoRA: %s Re-run install_plugin.py from the project folder.", msg)
            return start_state()
        argv = [python, "-m", "daemon", "--config", cfg_path]
        out = subprocess.DEVNULL
        if log_path:
            try:
                # owner-only, like the daemon config: the log may hold paths and job names
                fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                out = os.fdopen(fd, "ab")  # handed to the child, closed right after Popen
            except OSError:
                log_path = None
        try:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                env=_child_env(workdir, python),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                close_fds=True,
                **_detach_kwargs(),
            )
        except OSError as e:
            msg = f"Could not start the daemon ({e})."
            _set_state(state="failed", error=msg, log=log_path)
            log.error("Character LoRA: %s", msg)
            return start_state()
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        _set_state(state="starting", error=None, pid=proc.pid, log=log_path, exit_code=None, stop_requested=False)
        log.info("Character LoRA: started the training daemon (pid %s), log: %s", proc.pid, log_path)

    # reap it (no zombie) and record how it ended; a daemon thread, so it never holds ED open
    threading.Thread(target=_watch, args=(proc, cfg_url, log_path), name="character-lora-watch", daemon=True).start()
    return start_state()


def _watch(proc, cfg_url, log_path):
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if probe_daemon(cfg_url, timeout=0.5):
            with _start_lock:
                if _start_state.get("pid") == proc.pid:
                    _set_state(state="running")
            break
        time.sleep(0.5)
    code = proc.wait()
    with _start_lock:
        asked = bool(_start_state.get("stop_requested")) and code == 0
        if _start_state.get("pid") == proc.pid:
            if asked:  # the tab's Stop or Restart: not a failure to report
                _set_state(state="stopped", exit_code=code, error=None)
            else:
                _set_state(
                    state="exited",
                    exit_code=code,
                    error="The daemon exited with code {}; see {}.".format(code, log_path or "its output"),
                )
    if asked:
        log.info("Character LoRA: the training daemon stopped on request")
    else:
        log.warning("Character LoRA: the training daemon exited with code %s (log: %s)", code, log_path)


def start_in_background(settings_path=None):
    """Start the daemon from a thread so ED's start-up never waits on it. Returns the thread (or None)."""
    settings, problem = load_settings(settings_path)
    if problem or not settings.get("autostart"):
        return None
    try:
        cfg = (
            read_daemon_config(settings["daemon_config"]) if os.path.isfile(settings.get("daemon_config") or "") else {}
        )
    except Exception as e:
        log.error("Character LoRA: cannot read the daemon config: %s", e)
        cfg = {}
    url, _host = daemon_address(cfg)

    def run():
        try:
            spawn_daemon(settings, url)
        except Exception:  # never let the thread die silently
            log.exception("Character LoRA: starting the daemon failed")

    t = threading.Thread(target=run, name="character-lora-autostart", daemon=True)
    _set_state(state="checking", error=None)
    t.start()
    return t


# --------------------------------------------------------------------------------------------- stop, restart

STOP_TIMEOUT_S = 30.0  # the daemon's graceful shutdown waits up to 10 s for requests, then kills the trainer
RESTART_WAIT_S = 60.0


def _pid_alive(pid):
    """Whether process ``pid`` still runs (a zombie does not). Never signals it: on Windows ``os.kill(pid, 0)``
    would terminate the process."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x00100000, False, int(pid))  # SYNCHRONIZE
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) != 0  # WAIT_OBJECT_0: it has exited
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _post_shutdown(url, token, timeout=5.0):
    """POST <url>/shutdown with the token: the HTTP status, or None when nothing answered."""
    req = urllib.request.Request(url.rstrip("/") + "/shutdown", data=b"", method="POST",
                                 headers={"Authorization": "Bearer " + (token or "")})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def _wait_gone(url, pid, timeout):
    """Until the daemon no longer answers and its process has exited (so its data folder lock is free too)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not probe_daemon(url, timeout=0.5) and not (pid and _pid_alive(pid)):
            return True
        time.sleep(0.1)
    return False


def stop_daemon(cfg_path, cfg, timeout=STOP_TIMEOUT_S):
    """Stop the daemon this config describes. Returns (HTTP status for the tab, JSON body). Never raises."""
    url, _host = daemon_address(cfg)
    health = fetch_health(url)
    if health is None:
        return 200, {"stopped": False, "running": False, "message": f"The daemon at {url} was not running."}
    if is_ours(health, cfg_path) is False:
        problem = foreign_problem(health, url, cfg_path)
        return 409, {"error": problem["error"], "hint": problem["fix"]}
    pid = health.get("pid")
    with _start_lock:
        _set_state(stop_requested=True)
    status = _post_shutdown(url, cfg.get("token"))
    if status == 401:
        return 409, {"error": f"The daemon at {url} refused the token in {cfg_path}.",
                     "hint": "End process {} by hand, then start the daemon again.".format(pid or "of that daemon")}
    if status != 202:
        return 502, {"error": "The daemon at {} did not accept the stop request ({}).".format(
            url, "no answer" if status is None else f"HTTP {status}"),
            "hint": "Try again, or end process {} by hand.".format(pid or "of that daemon")}
    if not _wait_gone(url, pid, timeout):
        return 504, {"error": f"The daemon (process {pid}) did not stop within {timeout:.0f} s.",
                     "hint": f"End process {pid} by hand."}
    with _start_lock:
        if _start_state.get("state") != "stopped":  # a daemon this ED did not start (no watcher records it)
            _set_state(state="stopped", error=None)
    log.info("Character LoRA: stopped the training daemon (pid %s)", pid)
    return 200, {"stopped": True, "running": False, "pid": pid}


def restart_daemon(settings, cfg, wait=RESTART_WAIT_S):
    """Stop (if it runs), then start as the autostart does and wait until it answers. (status, body)."""
    cfg_path = settings.get("daemon_config")
    status, body = stop_daemon(cfg_path, cfg)
    if status != 200:
        return status, body
    url, _host = daemon_address(cfg)
    state = spawn_daemon(settings, url)
    deadline = time.time() + wait
    while state.get("state") == "starting" and time.time() < deadline:
        time.sleep(0.1)
        state = start_state()
    body = {"stopped": body.get("stopped"), "start": state}
    if state.get("state") in ("running", "already_running"):
        return 200, body
    body["error"] = state.get("error") or f"The daemon did not answer within {wait:.0f} s."
    return 500, body


def _bearer_ok(header, token):
    """The stop/restart routes take the daemon token, as the daemon's own mutating calls do: another page the
    browser visits cannot stop the daemon with a plain form post."""
    if not token or not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode("utf-8"), str(token).encode("utf-8"))


# --------------------------------------------------------------------------------------------- info


def build_info(settings_path=None, probe=True):
    """What ``GET /character-lora/info`` answers."""
    settings, settings_problem = load_settings(settings_path)
    problems = []
    if settings_problem:
        problems.append(
            {
                "error": settings_problem,
                "fix": "Run install_plugin.py again (it writes this file), then restart Easy Diffusion.",
            }
        )
    cfg = {}
    cfg_path = settings.get("daemon_config")
    if cfg_path:
        if os.path.isfile(cfg_path):
            try:
                cfg = read_daemon_config(cfg_path)
            except Exception as e:
                problems.append(
                    {
                        "error": f"The daemon config {cfg_path} cannot be read ({e}).",
                        "fix": "Fix the YAML in that file, or delete it and run install_plugin.py again.",
                    }
                )
        else:
            problems.append(
                {
                    "error": f"The daemon config {cfg_path} does not exist yet.",
                    "fix": "Run install_plugin.py again, or start the daemon once so it creates it.",
                }
            )
    url, listen_host = daemon_address(cfg)
    token = cfg.get("token") or None
    if cfg and not token:
        problems.append(
            {
                "error": "The daemon config has no token yet.",
                "fix": "Start the daemon once (it creates the token), or run install_plugin.py again.",
            }
        )
    ed = ed_paths(settings)
    lora_dir = cfg.get("ed_lora_dir")
    if lora_dir and ed["lora_dirs"] and not any(_same_dir(lora_dir, d) for d in ed["lora_dirs"]):
        problems.append(
            {
                "error": "The daemon saves LoRAs to {}, but Easy Diffusion reads them from {}.".format(
                    lora_dir, ", ".join(ed["lora_dirs"])
                ),
                "fix": "Run install_plugin.py again so the daemon uses Easy Diffusion's LoRA folder.",
            }
        )
    state = start_state()
    health = fetch_health(url) if probe else None
    running = (health is not None) if probe else None
    ours = is_ours(health, cfg_path)
    if ours is False:
        problems.append(foreign_problem(health, url, cfg_path))
    can_start = bool(settings.get("daemon_python") and cfg_path)
    return {
        "plugin_version": PLUGIN_VERSION,
        "daemon": {
            "url": url,
            "listen_host": listen_host,
            "token": token,
            "config_path": cfg_path,
            "allowed_origins": cfg.get("allowed_origins"),
            "autostart": bool(settings.get("autostart")),
            "can_start": can_start,
            "running": running,
            # False: what answers on the port is a leftover of another config (see problems); None: unknown
            "ours": ours,
            "pid": health.get("pid") if health else None,
            "start": state,
            "start_command": (
                "{} -m daemon --config {}".format(settings.get("daemon_python"), cfg_path) if can_start else None
            ),
            "workdir": settings.get("daemon_workdir"),
        },
        "ed": ed,
        "problems": problems,
    }


# --------------------------------------------------------------------------------------------- tab modules

# The tab's ES modules: install_plugin.py copies ed_plugin/ui/character-lora/ to <ED root>/plugins/ui/character-lora/,
# next to plugins/server/ where this file lives (the same relative place as in the project folder).
UI_MODULES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ui", "character-lora")
# a module name is one or two lower-case path segments ending in .js: no "..", no backslash, no absolute path
_UI_MODULE_RE = re.compile(r"[a-z][a-z0-9-]*(/[a-z][a-z0-9-]*)?\.js")
JS_MIME = "text/javascript; charset=utf-8"


def ui_module(name, ui_dir=None):
    """(status, body bytes, content type) for ``GET /character-lora/ui/<name>``. Never reads outside ui_dir."""
    ui_dir = os.path.realpath(ui_dir or UI_MODULES_DIR)
    if not isinstance(name, str) or not _UI_MODULE_RE.fullmatch(name):
        body = {"error": f"There is no tab module named {str(name)[:80]!r}."}
        return 404, json.dumps(body).encode("utf-8"), "application/json"
    path = os.path.realpath(os.path.join(ui_dir, *name.split("/")))
    try:
        inside = os.path.commonpath([ui_dir, path]) == ui_dir
    except ValueError:  # Windows: a link to another drive
        inside = False
    if not inside or not os.path.isfile(path):
        body = {"error": f"There is no tab module named {name!r}."}
        return 404, json.dumps(body).encode("utf-8"), "application/json"
    try:
        with open(path, "rb") as f:
            return 200, f.read(), JS_MIME
    except OSError as e:
        body = {"error": f"The tab module {name!r} cannot be read ({e.strerror})."}
        return 404, json.dumps(body).encode("utf-8"), "application/json"


# --------------------------------------------------------------------------------------------- routes


def register_routes(server_api, settings_path=None):
    """Add the plugin's routes to a FastAPI app (ED's ``server_api``)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    no_store = {"Cache-Control": "no-store", "Pragma": "no-cache"}

    @server_api.get(ROUTE_PREFIX + "/info")
    def character_lora_info():
        # sync handler: FastAPI runs it in its thread pool, so the health probe never blocks ED's loop
        return JSONResponse(build_info(settings_path), headers=no_store)

    @server_api.post(ROUTE_PREFIX + "/start")
    def character_lora_start():
        settings, problem = load_settings(settings_path)
        if problem:
            return JSONResponse({"error": problem, "hint": "Run install_plugin.py again."}, status_code=409)
        cfg = {}
        if os.path.isfile(settings.get("daemon_config") or ""):
            try:
                cfg = read_daemon_config(settings["daemon_config"])
            except Exception:
                cfg = {}
        url, _host = daemon_address(cfg)
        state = spawn_daemon(settings, url)
        status = 500 if state.get("state") in ("failed", "not_configured") else 200
        return JSONResponse({"start": state}, status_code=status, headers=no_store)

    def lifecycle(request, action):
        settings, problem = load_settings(settings_path)
        cfg_path = settings.get("daemon_config")
        if problem or not cfg_path or not os.path.isfile(cfg_path):
            return JSONResponse({"error": problem or "The daemon config is not set up.",
                                 "hint": "Run install_plugin.py again."}, status_code=409, headers=no_store)
        try:
            cfg = read_daemon_config(cfg_path)
        except Exception as e:
            return JSONResponse({"error": f"The daemon config {cfg_path} cannot be read ({e}).",
                                 "hint": "Fix the YAML in that file."}, status_code=409, headers=no_store)
        if not _bearer_ok(request.headers.get("authorization"), cfg.get("token")):
            return JSONResponse({"error": "This call needs the daemon token.",
                                 "hint": "Send 'Authorization: Bearer <token>' with the token from "
                                 + ROUTE_PREFIX + "/info."}, status_code=401, headers=no_store)
        status, body = stop_daemon(cfg_path, cfg) if action == "stop" else restart_daemon(settings, cfg)
        return JSONResponse(body, status_code=status, headers=no_store)

    @server_api.post(ROUTE_PREFIX + "/stop")
    def character_lora_stop(request: Request):
        # sync: FastAPI runs it in its thread pool while the daemon winds down
        return lifecycle(request, "stop")

    @server_api.post(ROUTE_PREFIX + "/restart")
    def character_lora_restart(request: Request):
        return lifecycle(request, "restart")
    @server_api.get(ROUTE_PREFIX + "/ui/{name:path}")
    def character_lora_ui_module(name: str):
        status, body, ctype = ui_module(name)
        # no-cache like ED's own /plugins/user files: an updated install shows after a page reload
        headers = {"Cache-Control": "no-cache, no-store, must-revalidate", "X-Content-Type-Options": "nosniff"}
        return Response(content=body, status_code=status, media_type=ctype, headers=headers)

    return server_api


def _init():
    try:
        from easydiffusion.server import server_api
    except Exception:
        # imported outside ED (tests, tools): nothing to hook into
        return
    try:
        register_routes(server_api)
        log.info("Character LoRA: added %s/info, /start, /stop, /restart and /ui/", ROUTE_PREFIX)
    except Exception:
        log.exception("Character LoRA: could not add the plugin's routes")
    try:
        start_in_background()
    except Exception:
        log.exception("Character LoRA: could not start the training daemon")


_init()
