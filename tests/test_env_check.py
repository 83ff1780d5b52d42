"""/config/test's checks, with the real GPU probe run in a real interpreter."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.pipeline.clip_tokenizer import (
    BIGG_TOKENIZER_ID,
    REACH_TIMEOUT_S,
    TOKENIZER_FILES,
    cached_snapshot,
    derive_bigg,
    hub_address,
    hub_cache_dir,
    reach,
)
from daemon.pipeline.env_check import (
    check_gpu,
    check_launcher,
    check_tokenizer,
    prepare_tokenizers,
    probe_gpu,
    run_checks,
    tokenizer_readiness,
)
from tests.helpers import make_config
from tests.tokenizer_files import write_hub_cache, write_tokenizer


def never_called(host: str, port: int, timeout_s: float) -> str | None:
    raise AssertionError(f"the readiness check tried to reach {host}:{port}")


def test_probe_runs_in_the_kohya_python_and_reports_missing_torch() -> None:
    info = probe_gpu(sys.executable)  # the test venv has no torch
    assert info.ran and not info.cuda
    assert info.error and "torch" in info.error


def test_probe_of_a_python_that_cannot_run(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("not a program")
    os.chmod(fake, 0o755)
    info = probe_gpu(str(fake))
    assert not info.ran and not info.cuda and "probe failed" in (info.error or "")


def test_launcher_check_fails_when_the_python_does_not_run(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("not a program")
    os.chmod(fake, 0o755)
    cfg = make_config(tmp_path, port=9131, kohya={"python": str(fake)})
    check = check_launcher(cfg, probe_gpu(str(fake)))
    assert not check.ok and "could not be run" in check.detail and check.fix
    good = make_config(tmp_path, port=9131)
    assert check_launcher(good, probe_gpu(sys.executable)).ok


def test_gpu_check_depends_on_allow_cpu(tmp_path: Path) -> None:
    info = probe_gpu(sys.executable)
    assert check_gpu(info, allow_cpu=True).ok
    refused = check_gpu(info, allow_cpu=False)
    assert not refused.ok and "allow_cpu" in refused.fix


def test_tokenizer_cache_must_hold_the_clip_folder(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, port=9131, kohya={"tokenizer_cache_dir": str(tmp_path / "tok")})
    assert not check_tokenizer(cfg, environ={}, reach=never_called).ok
    (tmp_path / "tok" / "openai_clip-vit-large-patch14").mkdir(parents=True)
    assert not check_tokenizer(cfg, environ={}, reach=never_called).ok  # an empty folder is not a tokenizer
    write_tokenizer(tmp_path / "tok" / "openai_clip-vit-large-patch14")
    assert check_tokenizer(cfg, environ={}, reach=never_called).ok


def test_every_failing_check_has_a_fix(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, port=9131, allow_cpu=False, base_model=str(tmp_path / "gone.safetensors"),
                      kohya={"script_path": str(tmp_path / "no" / "train_network.py"),
                             "workspace": str(tmp_path / "no"), "python": str(tmp_path / "nopython")})
    checks = run_checks(cfg, probe_gpu(str(tmp_path / "nopython")))
    failing = [c for c in checks if not c.ok]
    assert {c.name for c in failing} == {"kohya_script", "kohya_workspace", "launcher", "base_model", "gpu"}
    assert all(c.fix for c in failing)


# --------------------------------------------------------------------------------------------- tokenizer


def tok_config(tmp_path: Path, cache: Path | None = None) -> Config:
    kohya = {"tokenizer_cache_dir": str(cache)} if cache else {}
    return make_config(tmp_path, port=9131, kohya=kohya)


class Probe:
    """A stand-in for the connection test that records what it was asked."""

    def __init__(self, answer: str | None) -> None:
        self.answer, self.calls = answer, []

    def __call__(self, host: str, port: int, timeout_s: float) -> str | None:
        self.calls.append((host, port, timeout_s))
        return self.answer


def test_cache_dir_set_names_each_missing_or_broken_file(tmp_path: Path) -> None:
    folder = tmp_path / "tok" / "openai_clip-vit-large-patch14"
    cfg = tok_config(tmp_path, tmp_path / "tok")
    check = check_tokenizer(cfg, environ={}, reach=never_called)
    assert not check.ok and check.detail == f"{folder} is missing"
    assert all(name in check.fix for name in TOKENIZER_FILES) and str(folder) in check.fix
    write_tokenizer(folder)
    (folder / "merges.txt").unlink()
    (folder / "special_tokens_map.json").write_text("")
    (folder / "vocab.json").write_text('{"a</w>": 320, "photo')  # a copy cut short
    check = check_tokenizer(cfg, environ={}, reach=never_called)
    assert not check.ok
    assert check.detail == (f"{folder} lacks vocab.json (not a JSON object; copied only in part?), "
                            "merges.txt (missing), special_tokens_map.json (empty)")
    write_tokenizer(folder)
    check = check_tokenizer(cfg, environ={}, reach=never_called)
    assert check.ok and check.detail == str(folder)


def test_cache_dir_set_ignores_the_network_and_points_at_the_hf_cache_copy(tmp_path: Path) -> None:
    """A cache dir makes the daemon run kohya offline: reachable or not, the folder must be complete."""
    snapshot = write_hub_cache(tmp_path / "hf" / "hub")
    cfg = tok_config(tmp_path, tmp_path / "tok")
    check = check_tokenizer(cfg, environ={"HF_HOME": str(tmp_path / "hf")}, reach=Probe(None))
    assert not check.ok and f"from {snapshot} into" in check.fix


def test_no_cache_dir_but_tokenizer_in_the_hf_cache_is_ready_without_the_network(tmp_path: Path) -> None:
    cfg = tok_config(tmp_path)
    layouts = {
        "HF_HOME": (tmp_path / "a", tmp_path / "a" / "hub"),
        "HF_HUB_CACHE": (tmp_path / "b", tmp_path / "b"),
        "TRANSFORMERS_CACHE": (tmp_path / "c", tmp_path / "c"),
        "XDG_CACHE_HOME": (tmp_path / "d", tmp_path / "d" / "huggingface" / "hub"),
    }
    for var, (value, hub) in layouts.items():
        environ = {var: str(value)}
        assert hub_cache_dir(environ) == hub
        assert not check_tokenizer(cfg, environ=environ, reach=Probe("unreachable")).ok
        snapshot = write_hub_cache(hub)
        check = check_tokenizer(cfg, environ=environ, reach=never_called)
        assert check.ok and str(snapshot) in check.detail and "Hugging Face cache" in check.detail, var


def test_hf_cache_counts_only_when_refs_main_points_at_a_complete_snapshot(tmp_path: Path) -> None:
    environ = {"HF_HOME": str(tmp_path / "hf")}
    snapshot = write_hub_cache(tmp_path / "hf" / "hub")
    assert cached_snapshot(environ) == snapshot
    (snapshot / "vocab.json").unlink()  # e.g. a dangling link after the blobs were cleaned up
    assert cached_snapshot(environ) is None
    write_hub_cache(tmp_path / "hf" / "hub")
    (snapshot.parent.parent / "refs" / "main").write_text("0123abc")  # a revision never downloaded
    assert cached_snapshot(environ) is None
    (snapshot.parent.parent / "refs" / "main").write_text("../../..")
    assert cached_snapshot(environ) is None


def test_no_cache_dir_online_is_ready_with_a_note(tmp_path: Path) -> None:
    probe = Probe(None)
    check = check_tokenizer(tok_config(tmp_path), environ={"HF_HOME": str(tmp_path / "empty")}, reach=probe)
    assert check.ok and "will be downloaded on the first job" in check.detail
    assert probe.calls == [("huggingface.co", 443, REACH_TIMEOUT_S)]


def test_no_cache_dir_offline_is_not_ready_and_says_how_to_fix_it(tmp_path: Path) -> None:
    probe = Probe("huggingface.co could not be resolved (no network)")
    check = check_tokenizer(tok_config(tmp_path), environ={"HF_HOME": str(tmp_path / "empty")}, reach=probe)
    assert not check.ok
    assert "cannot be reached (huggingface.co could not be resolved (no network))" in check.detail
    assert str(tmp_path / "empty" / "hub") in check.detail
    assert "kohya.tokenizer_cache_dir" in check.fix and "--tokenizer-cache" in check.fix


def test_hf_offline_variable_means_no_download_even_when_online(tmp_path: Path) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        environ = {"HF_HOME": str(tmp_path / "empty"), var: "1"}
        check = check_tokenizer(tok_config(tmp_path), environ=environ, reach=never_called)
        assert not check.ok and f"{var} forbids downloading it" in check.detail and check.fix
    assert check_tokenizer(tok_config(tmp_path), environ={"HF_HOME": str(tmp_path / "e"), "HF_HUB_OFFLINE": "0"},
                           reach=Probe(None)).ok


def test_the_probe_goes_where_a_download_would(tmp_path: Path) -> None:
    assert hub_address({}) == ("huggingface.co", 443, "huggingface.co")
    assert hub_address({"HF_ENDPOINT": "http://hf-mirror.lan:8081"}) == ("hf-mirror.lan", 8081, "hf-mirror.lan")
    proxied = hub_address({"HTTPS_PROXY": "http://proxy.corp:3128"})
    assert proxied == ("proxy.corp", 3128, "huggingface.co (through the proxy proxy.corp)")
    assert hub_address({"https_proxy": "proxy.corp:3128", "NO_PROXY": "localhost,.huggingface.co"})[0] == \
        "huggingface.co"
    probe = Probe(None)
    environ = {"HF_HOME": str(tmp_path / "empty"), "HTTPS_PROXY": "http://proxy.corp:3128"}
    assert check_tokenizer(tok_config(tmp_path), environ=environ, reach=probe).ok
    assert probe.calls == [("proxy.corp", 3128, REACH_TIMEOUT_S)]


def test_run_checks_reports_an_offline_machine_as_not_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    checks = run_checks(tok_config(tmp_path), probe_gpu(sys.executable), reach=Probe("no route to host"))
    failing = [c for c in checks if not c.ok]
    assert [c.name for c in failing] == ["tokenizer"] and "no route to host" in failing[0].detail


async def test_config_test_of_a_real_daemon_says_the_tokenizer_is_missing_offline(
        start_daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What used to read 'fine' and fail 16 s into the job: no cache dir, nothing in the HF cache, no download."""
    from tests.helpers import free_port

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # deterministic without touching the network
    for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    client = await start_daemon(make_config(tmp_path, port=free_port()))
    body = await (await client.post("/config/test")).json()
    assert body["ready"] is False
    failing = {c["name"]: c for c in body["checks"] if not c["ok"]}
    assert set(failing) == {"tokenizer"} and "--tokenizer-cache" in failing["tokenizer"]["fix"]


# --------------------------------------------------------------------------------------------- SDXL tokenizers
BIGG_DIR = "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"


def test_sdxl_readiness_is_its_own_answer_and_sd1_stays_ready_without_it(tmp_path: Path) -> None:
    """An offline machine with CLIP-L's files only: SD 1.x trains; SDXL is named as not ready, with a fix."""
    environ = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    write_hub_cache(tmp_path / "hf" / "hub")
    ready = tokenizer_readiness(tok_config(tmp_path), environ=environ, reach=never_called)
    assert set(ready) == {"sd1", "sdxl"}
    assert ready["sd1"].ok and ready["sd1"].name == "tokenizer"
    sdxl = ready["sdxl"]
    assert not sdxl.ok and sdxl.name == "tokenizer_sdxl"
    assert sdxl.detail == (f"kohya.tokenizer_cache_dir is not set, SDXL's second tokenizer ({BIGG_TOKENIZER_ID}) "
                           f"is not in the Hugging Face cache ({tmp_path / 'hf' / 'hub'}), and HF_HUB_OFFLINE "
                           "forbids downloading it")
    assert "--tokenizer-cache DIR" in sdxl.fix and f"DIR/{BIGG_DIR}" in sdxl.fix
    # run_checks (each of which blocks training) keeps to what SD 1.x needs
    assert [c.name for c in run_checks(tok_config(tmp_path), probe_gpu(sys.executable)) if "tokenizer" in c.name] \
        == ["tokenizer"]
    snapshot = write_hub_cache(tmp_path / "hf" / "hub", tokenizer_id=BIGG_TOKENIZER_ID)
    sdxl = check_tokenizer(tok_config(tmp_path), arch="sdxl", environ=environ, reach=never_called)
    assert sdxl.ok and "SDXL's tokenizers" in sdxl.detail and str(snapshot) in sdxl.detail


def test_sdxl_readiness_tests_the_connection_once_for_every_family(tmp_path: Path) -> None:
    probe = Probe(None)
    ready = tokenizer_readiness(tok_config(tmp_path), environ={"HF_HOME": str(tmp_path / "empty")}, reach=probe)
    assert ready["sd1"].ok and ready["sdxl"].ok
    assert "will be downloaded on the first job" in ready["sdxl"].detail
    assert probe.calls == [("huggingface.co", 443, REACH_TIMEOUT_S)]


def test_sdxl_with_a_cache_dir_counts_on_making_bigg_from_clip_l(tmp_path: Path) -> None:
    cache = tmp_path / "tok"
    cfg = tok_config(tmp_path, cache)
    assert not check_tokenizer(cfg, arch="sdxl", environ={}, reach=never_called).ok  # no CLIP-L either
    write_tokenizer(cache / "openai_clip-vit-large-patch14")
    check = check_tokenizer(cfg, arch="sdxl", environ={}, reach=never_called)
    assert check.ok and f"{cache / BIGG_DIR} (made from openai_clip-vit-large-patch14 on the first SDXL job" \
        in check.detail
    made = derive_bigg(cache)
    assert made == cache / BIGG_DIR and sorted(p.name for p in made.iterdir()) == sorted(TOKENIZER_FILES)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    assert derive_bigg(cache) is None  # already there: nothing to do
    check = check_tokenizer(cfg, arch="sdxl", environ={}, reach=never_called)
    assert check.ok and check.detail == f"{cache / 'openai_clip-vit-large-patch14'}, {made}"


def test_a_broken_bigg_folder_is_not_ready_and_is_not_overwritten(tmp_path: Path) -> None:
    cache = tmp_path / "tok"
    write_tokenizer(cache / "openai_clip-vit-large-patch14")
    (cache / BIGG_DIR).mkdir()
    (cache / BIGG_DIR / "vocab.json").write_text('{"a": 1')
    check, made = prepare_tokenizers(tok_config(tmp_path, cache), "sdxl", environ={}, reach=never_called)
    assert made is None and not check.ok
    assert check.detail.startswith(f"{cache / BIGG_DIR} lacks vocab.json (not a JSON object")
    assert check.fix.startswith(f"Delete {cache / BIGG_DIR}")
    assert (cache / BIGG_DIR / "vocab.json").read_text() == '{"a": 1'


def test_without_clip_l_nothing_is_made(tmp_path: Path) -> None:
    cache = tmp_path / "tok"
    cache.mkdir()
    check, made = prepare_tokenizers(tok_config(tmp_path, cache), "sdxl", environ={}, reach=never_called)
    assert made is None and not check.ok and not (cache / BIGG_DIR).exists()
    assert check.detail == f"{cache / 'openai_clip-vit-large-patch14'} is missing"


# --------------------------------------------------------------------------------------------- the real probe


def test_real_probe_connects_to_a_listening_port_and_names_a_closed_one() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert reach("127.0.0.1", port, 2.0) is None
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: the connection is refused
        why = reach("127.0.0.1", port, 2.0)
    assert why is not None and f"127.0.0.1:{port}" in why


def test_real_probe_gives_up_on_a_resolver_that_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hanging(*args: object, **kwargs: object) -> list[object]:
        release.wait(10)
        raise OSError("released")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    started = time.monotonic()
    try:
        why = reach("huggingface.co", 443, 0.3)
    finally:
        release.set()
    assert why == "no DNS answer for huggingface.co within 0.3 s"
    assert time.monotonic() - started < 2.0


def test_real_probe_answers_within_its_bound_here() -> None:
    """Whatever this machine's network is (this sandbox has none), the answer comes within the timeout."""
    started = time.monotonic()
    why = reach(*hub_address({})[:2], REACH_TIMEOUT_S)
    assert why is None or "huggingface.co" in why
    assert time.monotonic() - started < REACH_TIMEOUT_S + 1.0
