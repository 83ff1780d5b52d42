"""Which daemon answers on a port: an id the ED server plugin can compute from its own settings.

A daemon left over from another config (another token, another data folder) that holds the port looks, to the
tab, like a daemon with the wrong token. `/health` reports this id so the server plugin can tell the two apart.
The plugin (ed_plugin/server/character_lora_plugin.py, ED's Python, stdlib only) computes the same value in
`expected_instance`; tests/test_lifecycle.py checks that both agree.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def instance_id(config_path: Path | None, data_dir: Path) -> str:
    """16 hex digits from the config file's real path; a daemon built without a config file (tests, embedding)
    is named by its data folder instead."""
    source = f"config:{_canonical(config_path)}" if config_path is not None else f"data:{_canonical(data_dir)}"
    return hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _canonical(path: Path) -> str:
    return os.path.normcase(os.path.realpath(os.path.abspath(str(path))))
