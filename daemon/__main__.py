"""`python -m daemon [--config PATH] [--host H] [--port P]`: start the daemon on its own port."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from daemon import __version__
from daemon.config import FORBIDDEN_PORTS, ConfigError, load_or_create, prepare_data_dir
from daemon.instance_lock import AlreadyRunning
from daemon.web.app import AccessLogger, create_app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m daemon", description="Character LoRA training daemon")
    parser.add_argument("--config", type=Path, help="config YAML (default: the per-user config dir)")
    parser.add_argument("--host", help="address to bind (overrides the config)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides the config)")
    parser.add_argument("--version", action="version", version=__version__)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, path, created = load_or_create(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the config folder or file cannot be created or read
        print(f"error: cannot use the config file {exc.filename or args.config} ({exc.strerror}); "
              "pass --config with a path you can write to", file=sys.stderr)
        return 2
    if args.host:
        config = replace(config, host=args.host)
    if args.port is not None:
        if not 1 <= args.port <= 65535 or args.port in FORBIDDEN_PORTS:
            print(f"error: --port {args.port} is not usable (1-65535, not 9000/7860/8188)", file=sys.stderr)
            return 2
        config = replace(config, port=args.port)
    if created:
        print(f"Wrote a default config to {path}", flush=True)
    print(f"Config: {path}", flush=True)
    try:
        prepare_data_dir(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = port_problem(config.host, config.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1

    def started(_: str) -> None:  # run_app calls this once the port is bound
        print(f"Character LoRA daemon {__version__} listening on {config.url}", flush=True)

    try:
        web.run_app(create_app(config), host=config.host, port=config.port, print=started, shutdown_timeout=10,
                    access_log_class=AccessLogger)
    except AlreadyRunning as exc:
        print(f"error: {exc.message} {exc.hint}", file=sys.stderr)
        return 1
    # Ctrl+C, SIGTERM and POST /shutdown all end here, after the running job was stopped and recorded.
    print("Character LoRA daemon stopped.", flush=True)
    return 0


def port_problem(host: str, port: int) -> str | None:
    """A sentence if host:port cannot be bound (another program, or a daemon already running)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"host '{host}' cannot be resolved: {exc}"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            sock.bind(addr)
        except OSError as exc:
            return (f"cannot listen on {host}:{port} ({exc.strerror}); is the daemon already running? "
                    "Otherwise pick another port with --port or in the config.")
    return None


if __name__ == "__main__":
    sys.exit(main())
