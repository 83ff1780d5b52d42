"""Where kohya finds the CLIP tokenizers of SD 1.x and SDXL, and whether it will find them on this machine.

sd-scripts (library/strategy_base.py, _load_tokenizer) loads each tokenizer id from
`<tokenizer_cache_dir>/<id with / replaced by _>` when that folder exists, else through transformers from the
Hugging Face cache or, failing that, from huggingface.co. SD 1.x loads `openai/clip-vit-large-patch14`; SDXL
(library/strategy_sdxl.py) loads that one and `laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`. Nothing here
downloads anything.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

TOKENIZER_ID = "openai/clip-vit-large-patch14"
TOKENIZER_FOLDER = TOKENIZER_ID.replace("/", "_")
# SDXL's second text encoder (OpenCLIP bigG). Its hub repo holds the same vocabulary, merges and special tokens
# as CLIP-L's (OpenCLIP uses OpenAI's BPE; laion's vocab.json is only written without spaces); the one
# difference, padding with "!" (id 0), sd-scripts sets in code: strategy_sdxl.py `tokenizer2.pad_token_id = 0`.
# So CLIP-L's four files serve as bigG's (../shared/harness/make_clip_tokenizer.py checks this against open_clip).
BIGG_TOKENIZER_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
BIGG_TOKENIZER_FOLDER = BIGG_TOKENIZER_ID.replace("/", "_")
# The tokenizers each family's trainer script loads, in the order it loads them.
TOKENIZERS_BY_ARCH: dict[str, tuple[str, ...]] = {
    "sd1": (TOKENIZER_ID,),
    "sdxl": (TOKENIZER_ID, BIGG_TOKENIZER_ID),
}
# What CLIPTokenizer.from_pretrained reads; tokenizer_config.json carries model_max_length 77, without which
# kohya would build prompts of the library's huge default length.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def folder_name(tokenizer_id: str) -> str:
    """The folder kohya looks for in --tokenizer_cache_dir."""
    return tokenizer_id.replace("/", "_")


def hub_repo_folder(tokenizer_id: str) -> str:
    """The Hugging Face hub cache's folder for a repo id."""
    return "models--" + tokenizer_id.replace("/", "--")


HUB_REPO_FOLDER = hub_repo_folder(TOKENIZER_ID)
DEFAULT_ENDPOINT = "https://huggingface.co"
REACH_TIMEOUT_S = 2.0
_TRUE = {"1", "on", "yes", "true"}

# (host, port, timeout in seconds) -> None when reachable, else a few words saying why not
Reach = Callable[[str, int, float], "str | None"]


def missing_files(folder: Path) -> list[str]:
    """The tokenizer files `folder` lacks, each with why ("merges.txt (empty)"); [] when all are usable."""
    if not folder.is_dir():
        return [f"{name} (no folder {folder})" for name in TOKENIZER_FILES]
    out: list[str] = []
    for name in TOKENIZER_FILES:
        path = folder / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            out.append(f"{name} (missing)")
            continue
        except OSError as exc:  # a dangling link into an HF cache's blobs, a folder of that name, no permission
            out.append(f"{name} (unreadable: {exc.strerror or type(exc).__name__})")
            continue
        if not data.strip():
            out.append(f"{name} (empty)")
        elif name.endswith(".json") and not _is_json_object(data):
            out.append(f"{name} (not a JSON object; copied only in part?)")
    return out


def _is_json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def hub_cache_dir(environ: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache transformers uses in a process with this environment (same order as theirs)."""
    for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(var):
            return _expand(environ[var])
    if environ.get("HF_HOME"):
        return _expand(environ["HF_HOME"]) / "hub"
    xdg = environ.get("XDG_CACHE_HOME")
    base = _expand(xdg) if xdg else Path(os.path.expanduser("~")) / ".cache"
    return base / "huggingface" / "hub"


def _expand(value: str) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(value)))


def cached_snapshot(environ: Mapping[str, str], tokenizer_id: str = TOKENIZER_ID) -> Path | None:
    """The HF-cache snapshot of the tokenizer that an offline from_pretrained would load, if it is complete.

    Without a connection transformers resolves the revision `main` through refs/main, so a snapshot only
    counts when refs/main points at it.
    """
    repo = hub_cache_dir(environ) / hub_repo_folder(tokenizer_id)
    try:
        commit = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not commit or "/" in commit or "\\" in commit or commit.startswith("."):
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if not missing_files(snapshot) else None


def derive_bigg(cache_dir: Path) -> Path | None:
    """Make `<cache_dir>/<bigG folder>` from the CLIP-L folder beside it, when it is missing and CLIP-L's is complete.

    Returns the folder made, or None when there was nothing to do (bigG's folder exists, or CLIP-L's is not
    usable). The copy is made in a temporary folder and renamed into place, so kohya never finds half of it.
    Raises OSError when the cache dir cannot be written.
    """
    source, target = cache_dir / TOKENIZER_FOLDER, cache_dir / BIGG_TOKENIZER_FOLDER
    if target.exists() or missing_files(source):
        return None
    staging = Path(tempfile.mkdtemp(prefix=f".{BIGG_TOKENIZER_FOLDER}.", dir=cache_dir))
    try:
        for name in TOKENIZER_FILES:
            shutil.copyfile(source / name, staging / name)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if target.exists() and not missing_files(target):
            return None  # another job made it at the same moment
        raise
    return target


def offline_forced(environ: Mapping[str, str]) -> str | None:
    """The variable that forbids transformers to download, if one is set."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


def hub_address(environ: Mapping[str, str]) -> tuple[str, int, str]:
    """(host, port, label) of what a download would connect to: HF_ENDPOINT, or the proxy requests would use."""
    endpoint = urlsplit(environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxy = _proxy_for(host, endpoint.scheme or "https", environ)
    if proxy:
        parsed = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return parsed.hostname, parsed.port or 8080, f"{host} (through the proxy {parsed.hostname})"
    return host, port, host


def _proxy_for(host: str, scheme: str, environ: Mapping[str, str]) -> str | None:
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    for entry in (e.strip().lstrip(".").lower() for e in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    for var in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if environ.get(var):
            return environ[var]
    return None


def reach(host: str, port: int, timeout_s: float = REACH_TIMEOUT_S) -> str | None:
    """None when a TCP connection to host:port opens within timeout_s (DNS included), else why not.

    Only a connection is opened and closed again; nothing is sent. getaddrinfo has no timeout of its own, so it
    runs in a daemon thread that is left behind if the resolver hangs.
    """
    deadline = time.monotonic() + timeout_s
    answer: list[object] = []

    def resolve() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            answer.append(exc)

    worker = threading.Thread(target=resolve, name="hub-dns", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not answer:
        return f"no DNS answer for {host} within {timeout_s:g} s"
    if isinstance(answer[0], Exception):
        return f"{host} could not be resolved ({answer[0]})"
    last = "no address"
    for family, kind, proto, _, addr in answer[0]:  # type: ignore[union-attr]
        left = deadline - time.monotonic()
        if left <= 0:
            return f"no connection to {host}:{port} within {timeout_s:g} s"
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(left)
                sock.connect(addr)
                return None
        except OSError as exc:
            last = str(exc) or type(exc).__name__
    return f"no connection to {host}:{port} ({last})"
