"""The README documents every setting, route, event type and error kind the daemon has."""

from __future__ import annotations

import re

from daemon.config import SETTINGS
from daemon.events import EventType
from daemon.pipeline.failure import FAILURE_KINDS
from daemon.web.app import create_app
from tests.helpers import REPO, make_config

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented() -> None:
    for setting in SETTINGS:
        assert f"`{setting.name}`" in README, setting.name


def test_every_event_type_is_documented() -> None:
    for event in EventType:
        assert f"`{event.value}`" in README, event.value


def test_every_route_is_documented(tmp_path) -> None:
    app = create_app(make_config(tmp_path, port=9131))
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = (route.resource.canonical if route.resource else "").replace("{job_id}", "{id}")
        assert f"`{route.method} {path}`" in README, (route.method, path)


def test_every_error_kind_is_documented() -> None:
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "daemon").rglob("*.py"))
    kinds = set(re.findall(r'JobError\(\s*"([a-z_]+)"', sources)) | set(re.findall(r'Failure\(\s*"([a-z_]+)"', sources))
    kinds |= set(re.findall(r'kind="([a-z_]+)"', sources)) | set(FAILURE_KINDS)
    assert kinds, "no error kinds found in the sources"
    for kind in kinds:
        assert f"`{kind}`" in README, kind
