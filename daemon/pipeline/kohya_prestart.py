"""Run by kohya's own python, not imported by the daemon: start a kohya script before the daemon's prep is done.

    python -u kohya_prestart.py --go GO_FILE [--max-wait S] SCRIPT

Imports SCRIPT as a module (torch, diffusers, transformers...: ~5 s of a ~20 s start on a CPU, see
tests/fixtures/kohya_startup/FACTS.md), then waits for the daemon's go file, a JSON object
{"script": SCRIPT, "argv": [ARGS...]}, and runs SCRIPT as `__main__` with exactly those arguments (runpy), as
`python -u SCRIPT ARGS...` would: sys.argv, sys.path[0] and the script's own `if __name__ == "__main__":` block
are the script's, so its output and exit code are unchanged. The second execution of the script's module-level
code finds every import done; at sd-scripts 48d368fa the rest of it is idempotent (setup_logging() returns when
handlers exist, init_ipex()'s hijack skips itself).

Anything that fails while importing is left for the real run to raise again, with its usual traceback: this
wrapper prints nothing of its own unless it gives up waiting. It exits without running anything when the daemon
that started it is gone (POSIX) or no go file came within --max-wait seconds.

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
import time

POLL_S = 0.02
EXIT_NO_GO = 3


def wait_for_go(go_file: str, max_wait_s: float, parent: int) -> dict[str, object] | None:
    """The go file's JSON once it exists (the daemon writes it atomically); None when the daemon is gone."""
    end = time.monotonic() + max_wait_s
    while time.monotonic() < end:
        try:
            with open(go_file, encoding="utf-8") as fh:
                go = json.load(fh)
        except FileNotFoundError:
            if os.name == "posix" and os.getppid() != parent:
                return None  # re-parented: the daemon died without telling us
            time.sleep(POLL_S)
            continue
        os.unlink(go_file)
        return go
    print(f"kohya_prestart: no go signal in {go_file} within {max_wait_s:.0f} s; exiting", file=sys.stderr, flush=True)
    return None


def main() -> int:
    parent = os.getppid()
    ap = argparse.ArgumentParser(prog="kohya_prestart.py")
    ap.add_argument("--go", required=True)
    ap.add_argument("--max-wait", type=float, default=3600.0)
    ap.add_argument("script")
    opts = ap.parse_args()
    script = os.path.abspath(opts.script)
    # As `python SCRIPT` sets it: the script's folder first, never this file's (daemon/pipeline would shadow names).
    sys.path[0] = os.path.dirname(script)
    sys.argv = [script]
    stem = os.path.splitext(os.path.basename(script))[0]
    # Whatever fails here, the real run raises again below, with the script's own traceback.
    with contextlib.suppress(BaseException):
        importlib.import_module(stem)
    go = wait_for_go(opts.go, opts.max_wait, parent)
    if go is None:
        return EXIT_NO_GO
    run_script = os.path.abspath(str(go.get("script") or script))
    args = go.get("argv")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        print(f"kohya_prestart: bad go file {opts.go}", file=sys.stderr, flush=True)
        return 2
    sys.path[0] = os.path.dirname(run_script)
    sys.argv = [run_script, *args]
    runpy.run_path(run_script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
