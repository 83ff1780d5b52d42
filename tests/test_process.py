"""The trainer process: output from both pipes, and the whole tree stopped on cancel."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import psutil

from daemon.pipeline.process import kill_tree, start_trainer

TREE = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print("child", child.pid, flush=True)
    sys.stderr.write("bar\\r50%\\r")
    sys.stderr.flush()
    time.sleep(60)
""")


async def test_output_arrives_from_both_pipes_and_cancel_kills_the_tree(tmp_path) -> None:
    proc = await start_trainer([sys.executable, "-u", "-c", TREE], cwd=str(tmp_path), env={"PATH": "/usr/bin"})
    seen = ""
    child_pid = None
    async for chunk in proc.output():
        seen += chunk.text
        if "child" in seen and "50%" in seen:
            child_pid = int(seen.split("child ", 1)[1].split()[0])
            break
    assert child_pid is not None and psutil.pid_exists(child_pid)
    await proc.terminate_tree(grace_s=2)
    assert proc.returncode is not None
    await asyncio.sleep(0.1)
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE


def test_kill_tree_does_not_touch_a_reused_pid() -> None:
    me = psutil.Process()
    assert kill_tree(me.pid, started=me.create_time() - 1000) == []
    assert me.is_running()
