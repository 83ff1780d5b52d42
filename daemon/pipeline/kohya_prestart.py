"""Run by kohya's own python, not imported by the daemon: start a kohya script before the daemon's prep is done.

    python -u kohya_prestart.py --go GO_FILE [--parent PID] [--max-wait S] [--ready FILE] SCRIPT

Imports SCRIPT as a module (torch, diffusers, transformers...: ~5 s of a ~20 s start on a CPU, see
tests/fixtures/kohya_startup/FACTS.md), then waits for the daemon's go file, a JSON object
{"script": SCRIPT, "argv": [ARGS...]}, and runs SCRIPT as `__main__` with exactly those arguments (runpy), as
`python -u SCRIPT ARGS...` would: sys.argv, sys.path[0] and the script's own `if __name__ == "__main__":` block
are the script's, so its output and exit code are unchanged. The second execution of the script's module-level
code finds every import done; at sd-scripts 48d368fa the rest of it is idempotent (setup_logging() returns when
handlers exist, init_ipex()'s hijack skips itself).

The go file may also name a "sha256_file", where the daemon writes the base checkpoint's sha256 once its warm-up has
read the file whole ({"path", "size", "mtime_ns", "sha256"}). Then kohya's train_util.calculate_sha256 (the
metadata's ss_new_sd_model_hash: a second full read of the checkpoint, ~10-20 s after go) returns that value for
that file while its size and mtime are unchanged, and runs as before in every other case (not written yet,
another file); at an sd-scripts without that function nothing is replaced.

--ready FILE is created once the imports are done (the daemon's standby trainer, standby.py: a bench waits for it).

Anything that fails while importing is left for the real run to raise again, with its usual traceback: this
wrapper prints nothing of its own unless it gives up waiting. It exits without running anything when the daemon
that started it is gone (POSIX) or no go file came within --max-wait seconds. --parent is the daemon's pid: a daemon
killed before this process got to read its own parent must not leave it waiting an hour, and while the imports run
(seconds to tens of seconds) a watcher thread checks too.

Standard library only: kohya's venv does not have the daemon's packages.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import runpy
import sys
import threading
import time

POLL_S = 0.02
EXIT_NO_GO = 3


def wait_for_go(go_file: str, max_wait_s: float, parent: int) -> dict[str, object] | None:
    """The go file's JSON once it exists (the daemon writes it atomically); None when the daemon is gone."""
    end = time.monotonic() + max_wait_s
    while time.monotonic() < end:
        if orphaned(parent):
            return None  # re-parented: the daemon died without telling us (checked first: never run its go)
        try:
            with open(go_file, encoding="utf-8") as fh:
                go = json.load(fh)
        except FileNotFoundError:
            time.sleep(POLL_S)
            continue
        os.unlink(go_file)
        return go
    print(f"kohya_prestart: no go signal in {go_file} within {max_wait_s:.0f} s; exiting", file=sys.stderr, flush=True)
    return None


def orphaned(parent: int) -> bool:
    """True when the daemon that started us is gone: we were re-parented (POSIX only; elsewhere never)."""
    return os.name == "posix" and os.getppid() != parent


def watch_parent(parent: int, until: threading.Event, poll_s: float = 0.1) -> threading.Thread:
    """Exit the whole process as soon as the daemon is gone, until `until` is set (the imports are done)."""
    def watch() -> None:
        while not until.wait(poll_s):
            if orphaned(parent):
                os._exit(EXIT_NO_GO)  # the main thread is inside an import: nothing to unwind, nothing to flush

    thread = threading.Thread(target=watch, name="parent watch", daemon=True)
    thread.start()
    return thread


def known_sha256(hash_file: str, filename: str) -> str | None:
    """The daemon's sha256 of `filename` from `hash_file`, when it is there and the file is unchanged since."""
    try:
        with open(hash_file, encoding="utf-8") as fh:
            entry = json.load(fh)
        st = os.stat(filename)
        if (entry["path"] == os.path.realpath(filename) and entry["size"] == st.st_size
                and entry["mtime_ns"] == st.st_mtime_ns):
            return str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def use_known_hashes(hash_file: str) -> bool:
    """Serve kohya's calculate_sha256 from the daemon's `hash_file` where it can; True when it was replaced."""
    train_util = sys.modules.get("library.train_util")
    original = getattr(train_util, "calculate_sha256", None)
    if not callable(original):
        return False

    def calculate_sha256(filename, *args, **kwargs):  # type: ignore[no-untyped-def]
        known = known_sha256(hash_file, filename) if isinstance(filename, str) and not args and not kwargs else None
        return known if known is not None else original(filename, *args, **kwargs)

    train_util.calculate_sha256 = calculate_sha256  # type: ignore[union-attr]
    return True


def main() -> int:
    ap = argparse.ArgumentParser(prog="kohya_prestart.py")
    ap.add_argument("--go", required=True)
    ap.add_argument("--parent", type=int, default=os.getppid())
    ap.add_argument("--max-wait", type=float, default=3600.0)
    ap.add_argument("--ready")
    ap.add_argument("script")
    opts = ap.parse_args()
    script = os.path.abspath(opts.script)
    # As `python SCRIPT` sets it: the script's folder first, never this file's (daemon/pipeline would shadow names).
    sys.path[0] = os.path.dirname(script)
    sys.argv = [script]
    stem = os.path.splitext(os.path.basename(script))[0]
    if orphaned(opts.parent):
        return EXIT_NO_GO
    imported = threading.Event()
    watch_parent(opts.parent, imported)
    # Whatever fails here, the real run raises again below, with the script's own traceback.
    with contextlib.suppress(BaseException):
        importlib.import_module(stem)
    imported.set()
    if opts.ready:
        with contextlib.suppress(OSError), open(opts.ready, "w", encoding="utf-8"):
            pass
    go = wait_for_go(opts.go, opts.max_wait, opts.parent)
    if opts.ready:
        # No longer waiting, told to go or not: removed here, since a job that took us mid-import removed it before
        # we made it, and a dead daemon never will.
        with contextlib.suppress(OSError):
            os.unlink(opts.ready)
    if go is None:
        return EXIT_NO_GO
    run_script = os.path.abspath(str(go.get("script") or script))
    args = go.get("argv")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        print(f"kohya_prestart: bad go file {opts.go}", file=sys.stderr, flush=True)
        return 2
    if isinstance(go.get("sha256_file"), str):
        use_known_hashes(str(go["sha256_file"]))
    sys.path[0] = os.path.dirname(run_script)
    sys.argv = [run_script, *args]
    runpy.run_path(run_script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
