"""A small aiohttp stand-in for Easy Diffusion's web server, for the browser test of the UI plugin.

Serves the fake ED page (index.html + ed-globals.js + ed-fake.css from this folder) and the endpoints of
ED's server that the page and our plugin use, with ED's paths and response shapes:

    GET  /                               the page
    GET  /media/ed-fake/<file>           this folder's assets
    GET  /plugins/user/<path>            <ED root>/plugins/ui/<path> (no-cache, like ED's NoCacheStaticFiles)
    GET  /get/ui_plugins                 ["/plugins/user/<name>.plugin.js", ...]
    GET  /get/models                     {"models": [{"model", "name", "tags": [type, arch?]}]} from a disk scan
    GET  /get/app_config                 {"models_dir", "net": {"listen_port"}}
    GET/POST /bucket/<path>              ED's Bucket store (in memory here; sqlite in ED); POST answers 500
                                         after saving, as ED does on Python >= 3.9
    GET  /character-lora/info            answered by the installed server plugin's build_info()
    POST /character-lora/start           answered by the installed server plugin's spawn_daemon()
    POST /character-lora/stop, /restart  token-checked (_bearer_ok), answered by its stop_daemon()/restart_daemon()
    GET  /character-lora/ui/<name>       the tab's ES modules, answered by the installed server plugin's ui_module()
                                         (absent with serve_ui_modules=False: ED not restarted after the install)

The /character-lora routes call the real server plugin file that install_plugin.py copied into
<ED root>/plugins/server/, loaded by path (inside ED the plugin adds the same routes to ED's FastAPI app).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import struct
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web

HERE = Path(__file__).resolve().parent
NO_CACHE = {"Cache-Control": "no-cache, no-store, must-revalidate", "Pragma": "no-cache", "Expires": "0"}
MODEL_EXTENSIONS = {
    "stable-diffusion": (".ckpt", ".safetensors", ".sft", ".gguf"),
    "lora": (".ckpt", ".safetensors", ".sft", ".pt"),
    "vae": (".vae.pt", ".ckpt", ".safetensors", ".sft", ".gguf"),
}


def load_server_plugin(ed_root: Path, name: str = "character_lora_plugin") -> ModuleType:
    path = ed_root / "plugins" / "server" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_edfake_{name}_{id(ed_root)}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sd_tag(path: Path) -> str | None:
    """ED tags safetensors checkpoints with their architecture (model_identifier.py); .ckpt get none."""
    if path.suffix not in (".safetensors", ".sft"):
        return None
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            keys = json.loads(fh.read(length)).keys()
    except (OSError, ValueError, struct.error):
        return None
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sd_xl_base"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd_v2_base"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd_v1_base"
    return None


def scan_models(models_dir: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for kind, exts in MODEL_EXTENSIONS.items():
        folder = models_dir / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            ext = next((e for e in exts if path.name.endswith(e)), None)
            if ext is None:
                continue
            model_id = path.relative_to(folder).as_posix()[: -len(ext)]
            tags = [kind]
            if kind == "stable-diffusion":
                tag = _sd_tag(path)
                if tag:
                    tags.append(tag)
            out.append({"model": model_id, "name": model_id, "tags": tags})
    return out


class FakeEd:
    def __init__(self, ed_root: Path, *, models_dir: Path | None = None, settings_path: Path | None = None,
                 listen_port: int = 9000, bucket_post_fails_after_saving: bool = True,
                 serve_ui_modules: bool = True) -> None:
        self.ed_root = ed_root
        self.models_dir = models_dir or ed_root / "models"
        self.settings_path = settings_path
        self.listen_port = listen_port
        self.bucket_post_fails_after_saving = bucket_post_fails_after_saving
        self.serve_ui_modules = serve_ui_modules
        self.bucket: dict[str, bytes] = {}
        self.plugin = load_server_plugin(ed_root)
        self.requests: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/media/ed-fake/{name}", self.media)
        app.router.add_get("/plugins/user/{path:.+}", self.user_plugin)
        app.router.add_get("/get/ui_plugins", self.ui_plugins)
        app.router.add_get("/get/models", self.models)
        app.router.add_get("/get/app_config", self.app_config)
        app.router.add_get("/bucket/{path:.+}", self.bucket_get)
        app.router.add_post("/bucket/{path:.+}", self.bucket_post)
        app.router.add_get("/character-lora/info", self.info)
        app.router.add_post("/character-lora/start", self.start)
        app.router.add_post("/character-lora/stop", self.stop)
        app.router.add_post("/character-lora/restart", self.restart)
        if self.serve_ui_modules:
            app.router.add_get("/character-lora/ui/{name:.+}", self.ui_module)
        return app

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(HERE / "index.html", headers=NO_CACHE)

    async def media(self, request: web.Request) -> web.StreamResponse:
        path = HERE / request.match_info["name"]
        if path.suffix not in (".js", ".css", ".html") or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers=NO_CACHE)

    async def user_plugin(self, request: web.Request) -> web.StreamResponse:
        base = (self.ed_root / "plugins" / "ui").resolve()
        path = (base / request.match_info["path"]).resolve()
        if base not in path.parents or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers=NO_CACHE)

    async def ui_plugins(self, request: web.Request) -> web.Response:
        folder = self.ed_root / "plugins" / "ui"
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(".plugin.js"))
        return web.json_response([f"/plugins/user/{n}" for n in names])

    async def models(self, request: web.Request) -> web.Response:
        self.requests.append("get_models")
        models = await asyncio.to_thread(scan_models, self.models_dir)
        return web.json_response({"models": models})

    async def app_config(self, request: web.Request) -> web.Response:
        return web.json_response({"models_dir": str(self.models_dir), "net": {"listen_port": self.listen_port}})

    async def bucket_get(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        if path not in self.bucket:
            raise web.HTTPNotFound()
        ctype = "application/json" if path.endswith(".json") else "application/octet-stream"
        return web.Response(body=self.bucket[path], content_type=ctype)

    async def bucket_post(self, request: web.Request) -> web.Response:
        form = await request.post()
        item = form.get("file")
        data = item.file.read() if hasattr(item, "file") else str(item or "").encode()
        self.bucket[request.match_info["path"]] = data
        if self.bucket_post_fails_after_saving:
            # ED on Python >= 3.9: bucket_manager saves the file, then calls base64.encodestring (removed in
            # 3.9) to build its answer, so the client gets a 500 although the data is stored
            return web.json_response({"detail": "Internal Server Error"}, status=500)
        return web.json_response({"filename": request.match_info["path"].rsplit("/", 1)[-1]})

    async def info(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self.plugin.build_info, str(self.settings_path) if self.settings_path else None)
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def start(self, request: web.Request) -> web.Response:
        settings, problem = self.plugin.load_settings(str(self.settings_path) if self.settings_path else None)
        if problem:
            return web.json_response({"error": problem}, status=409)
        cfg = self.plugin.read_daemon_config(settings["daemon_config"])
        url, _ = self.plugin.daemon_address(cfg)
        state = await asyncio.to_thread(self.plugin.spawn_daemon, settings, url)
        return web.json_response({"start": state})

    async def stop(self, request: web.Request) -> web.Response:
        return await self._lifecycle(request, "stop")

    async def restart(self, request: web.Request) -> web.Response:
        return await self._lifecycle(request, "restart")

    async def _lifecycle(self, request: web.Request, action: str) -> web.Response:
        """The plugin's register_routes() lifecycle handler, on aiohttp: same checks, same status codes."""
        settings, problem = self.plugin.load_settings(str(self.settings_path) if self.settings_path else None)
        cfg_path = settings.get("daemon_config")
        if problem or not cfg_path or not Path(cfg_path).is_file():
            return web.json_response({"error": problem or "The daemon config is not set up.",
                                      "hint": "Run install_plugin.py again."}, status=409)
        cfg = self.plugin.read_daemon_config(cfg_path)
        if not self.plugin._bearer_ok(request.headers.get("Authorization"), cfg.get("token")):
            return web.json_response({"error": "This call needs the daemon token."}, status=401)
        if action == "stop":
            status, body = await asyncio.to_thread(self.plugin.stop_daemon, cfg_path, cfg)
        else:
            status, body = await asyncio.to_thread(self.plugin.restart_daemon, settings, cfg)
        return web.json_response(body, status=status)

    async def ui_module(self, request: web.Request) -> web.Response:
        status, body, ctype = self.plugin.ui_module(request.match_info["name"])
        mime, _, charset = ctype.partition("; charset=")
        return web.Response(body=body, status=status, content_type=mime, charset=charset or None, headers=NO_CACHE)


class ServerThread:
    """Run an aiohttp app on 127.0.0.1:<port> in a background thread (the browser test is synchronous)."""

    def __init__(self, app: web.Application, port: int) -> None:
        self.app = app
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"fake-ed-{port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.runner = web.AppRunner(self.app, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        self.loop.run_until_complete(start())
        self.started.set()
        self.loop.run_forever()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        if not self.started.wait(10):
            raise RuntimeError("the fake ED server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self.runner is not None:
                await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
