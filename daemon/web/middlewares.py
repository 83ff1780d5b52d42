"""Security and error shaping, applied to every request before any handler runs.

Order: errors (outermost, so every failure below becomes JSON) → host/origin (DNS rebinding, foreign
pages) → CORS → token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from daemon.config import Config, LiveConfig
from daemon.errors import DaemonError, Forbidden, Unauthorized
from daemon.jobs.fields import is_control

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC_ROUTES = frozenset({("GET", "/health"), ("HEAD", "/health")})
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def allowed_hosts(config: Config) -> frozenset[str]:
    """`Host` values that name this daemon; anything else is a DNS-rebinding attempt."""
    names = {config.host, "localhost", "127.0.0.1", "[::1]"}
    if ":" in config.host and not config.host.startswith("["):
        names.add(f"[{config.host}]")
    if config.host in WILDCARD_HOSTS:
        # Reached from other machines: by the names of the pages the user allowed (e.g. ED on a LAN IP).
        hostnames = {urlsplit(origin).hostname or "" for origin in config.allowed_origins} - {""}
        names |= {f"[{h}]" if ":" in h else h for h in hostnames}
    return frozenset(f"{name}:{config.port}".lower() for name in names)


def error_middleware() -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (DaemonError, web.HTTPException) as exc:
            return error_response(exc, request)
        except ConnectionError:
            return client_gone_response(request)
        except Exception:
            return unexpected_error_response(request)

    return middleware


def shown_path(request: web.BaseRequest) -> str:
    """The request's path for the console. It is percent-decoded, so a client could put a line break (a forged
    log line), a terminal escape, a NUL or a bidi control in it (%0A, %1B, %00, %E2%80%AE): those are written as
    Python escapes, and every request stays one plain line."""
    return "".join(ascii(ch)[1:-1] if is_control(ch) else ch for ch in request.path)


def unexpected_error_response(request: web.Request) -> web.Response:
    """A bug: logged with its traceback, answered without one. Call from an `except` block."""
    log.exception("unhandled error in %s %s", request.method, shown_path(request))
    return web.json_response({"error": "The daemon hit an unexpected error; see its console output."}, status=500)


def client_gone_response(request: web.Request) -> web.Response:
    """The client hung up mid-request (a closed tab, a dropped upload): normal, so one quiet line. The handler
    has already removed what the request stored; this answer reaches no one."""
    log.info("the client left during %s %s", request.method, shown_path(request))
    return web.json_response({"error": "The connection closed before the request was complete."}, status=400)


class QuietProtocolErrors(logging.Filter):
    """aiohttp answers a request it cannot parse (no valid HTTP: a header over 8 KiB, control characters in
    a header, a bad request line) with its own 400 before any handler runs, and logs the parser's traceback
    at ERROR. That is the client's mistake, not ours: keep one line at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            record.msg, record.args = "refused a request that is not valid HTTP: %s", (_one_line(exc.message),)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def protocol_logger() -> logging.Logger:
    """The logger aiohttp's connection handler writes to (handler_args in app.py), with malformed requests
    kept to one line."""
    logger = logging.getLogger("daemon.web.http")
    if not any(isinstance(f, QuietProtocolErrors) for f in logger.filters):
        logger.addFilter(QuietProtocolErrors())
    return logger


def error_response(exc: DaemonError | web.HTTPException, request: web.BaseRequest | None = None) -> web.StreamResponse:
    """Every error as JSON `{"error": sentence, ...}`; redirects and successes pass through."""
    if isinstance(exc, DaemonError):
        return web.json_response(exc.to_json(), status=exc.status)
    if exc.status < 400:
        raise exc
    message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else _http_sentence(exc, request)
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return web.json_response({"error": message}, status=exc.status, headers=headers)


def _http_sentence(exc: web.HTTPException, request: web.BaseRequest | None) -> str:
    """aiohttp's own refusals (no such route, wrong method) as a sentence naming the request."""
    if request is None:
        return f"{exc.reason}."
    target = f"{request.method} {_one_line(request.path)}"
    if isinstance(exc, web.HTTPNotFound):
        return f"There is no {target}; the README lists the daemon's routes."
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"{target} is not allowed; this path takes {allowed}."
    return f"{exc.reason}: {target}."


@dataclass(frozen=True)
class _Policy:
    """Who may call, derived once per config (a reload makes a new one)."""

    config: Config
    hosts: frozenset[str]
    origins: frozenset[str]  # pages that get CORS
    accepted: frozenset[str]  # those and the daemon's own address
    token: bytes

    @classmethod
    def of(cls, config: Config) -> _Policy:
        hosts = allowed_hosts(config)
        origins = frozenset(o.rstrip("/") for o in config.allowed_origins)
        return cls(config, hosts, origins, origins | {f"http://{h}" for h in hosts}, config.token.encode())


def security_middleware(live: LiveConfig) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Checks each request against the settings in force when it arrives (allowed_origins and token can
    change while the daemon runs)."""
    policy = _Policy.of(live.current)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal policy
        if policy.config is not live.current:
            policy = _Policy.of(live.current)
        rules = policy  # this request's, even if a reload lands while it runs
        host = (request.headers.get("Host") or "").lower()
        if host not in rules.hosts:
            raise Forbidden(f"Host '{host}' is not this daemon's address.",
                            hint=f"Call the daemon as {rules.config.url}.")
        origin = request.headers.get("Origin")
        if origin is not None and origin.rstrip("/") not in rules.accepted:
            raise Forbidden(f"Origin '{origin}' may not use this daemon.",
                            hint="Add the page's origin to allowed_origins in the daemon config.")
        cors = origin is not None and origin.rstrip("/") in rules.origins

        if request.method == "OPTIONS":
            response: web.StreamResponse = web.Response(status=204)
            if cors:
                response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
                response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
                response.headers["Access-Control-Max-Age"] = "600"
                if request.headers.get("Access-Control-Request-Private-Network") == "true":
                    response.headers["Access-Control-Allow-Private-Network"] = "true"
        else:
            try:
                if (request.method, request.path) not in PUBLIC_ROUTES:
                    _check_token(request, rules.token)
                response = await handler(request)
            except (DaemonError, web.HTTPException) as exc:
                response = error_response(exc, request)
            except ConnectionError:
                response = client_gone_response(request)
            except Exception:
                # Answered here, not by the outer middleware, so the page can read it (CORS below).
                response = unexpected_error_response(request)
        if cors and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin  # type: ignore[assignment]
            response.headers["Vary"] = "Origin"
        return response

    return middleware


def _check_token(request: web.Request, token: bytes) -> None:
    sent = ""
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        sent = auth[7:].strip()
    elif request.path == "/ws":
        # Browsers cannot set headers on a WebSocket handshake.
        sent = request.query.get("token", "")
    if not sent:
        raise Unauthorized("This call needs the daemon token.",
                           hint="Send 'Authorization: Bearer <token>' (the token is in the daemon config).")
    try:
        # aiohttp keeps header bytes that are not UTF-8 as surrogates; such a token can only be wrong.
        sent_bytes = sent.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        sent_bytes = b""
    if not hmac.compare_digest(sent_bytes, token):
        raise Unauthorized("The daemon token is wrong.", hint="Use the token from the daemon config file.")
