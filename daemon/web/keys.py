"""Typed application state (aiohttp AppKeys): the only way handlers reach the daemon's parts."""

from __future__ import annotations

from aiohttp import web

from daemon.config import LiveConfig
from daemon.gpu import GpuCache
from daemon.hub import EventHub
from daemon.jobs.queue import JobQueue
from daemon.jobs.store import JobStore

# The settings in force: read `.current` where they are used (a reload replaces it).
CONFIG = web.AppKey("config", LiveConfig)
STORE = web.AppKey("store", JobStore)
HUB = web.AppKey("hub", EventHub)
QUEUE = web.AppKey("queue", JobQueue)
GPU = web.AppKey("gpu", GpuCache)
