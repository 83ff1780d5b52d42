"""The kohya test double, run as a subprocess exactly as the daemon runs kohya, with the daemon's argv.

These pin the double to the real trainer's contract (tests/fixtures/real_kohya_proof.md and
/work/shared/kohya-logs/cpu): if the double drifts, the daemon's other tests prove nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image
from safetensors import safe_open

from daemon.pipeline.kohya import KohyaLaunch, build_command, build_env, dataset_config, write_dataset_config
from daemon.pipeline.params import TrainParams, total_steps
from tests.helpers import KOHYA_DOUBLE, write_sd1_checkpoint

# Test-only: 64 px is below resolve_params' floor, so the params are built directly.
TINY = TrainParams(
    resolution=64,
    epochs=2,
    repeats=2,
    batch_size=2,
    network_dim=4,
    network_alpha=2.0,
    unet_lr=1e-4,
    text_encoder_lr=5e-5,
    optimizer="AdamW",
    mixed_precision="no",
    seed=42,
    save_every_n_epochs=1,
    preset="balanced",
)
IMAGES = 4
KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclasses.dataclass
class Job:
    root: Path
    img: Path
    out: Path
    launch: KohyaLaunch

    def argv(self, params: TrainParams = TINY, **changes: object) -> list[str]:
        launch = dataclasses.replace(self.launch, **changes)
        write_dataset_config(
            Path(launch.dataset_config),
            dataset_config(image_dir=str(self.img), class_tokens="sks person", params=params),
        )
        return build_command(params, launch)

    def env(self, **extra: str) -> dict[str, str]:
        env = build_env(os.environ, tokenizer_cache_dir=self.launch.tokenizer_cache_dir, cpu=True)
        env["KOHYA_DOUBLE_STEP_SECONDS"] = "0"
        return {**env, **extra}

    def run(self, argv: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            argv,
            cwd=self.root / "workspace",
            env=self.env(**extra),
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        # Decoded by hand: text=True would turn tqdm's \r redraws into \n.
        return subprocess.CompletedProcess(
            res.args, res.returncode, res.stdout.decode("utf-8"), res.stderr.decode("utf-8")
        )


def make_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (i * 40 % 256, 90, 200)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text("sks person, smiling\n", encoding="utf-8")


@pytest.fixture
def job(tmp_path: Path) -> Job:
    img = tmp_path / "img"
    make_images(img, IMAGES)
    (tmp_path / "workspace").mkdir()
    (tmp_path / "tokenizers" / "openai_clip-vit-large-patch14").mkdir(parents=True)
    model = write_sd1_checkpoint(tmp_path / "models" / "sd15.safetensors")
    launch = KohyaLaunch(
        script_path=str(KOHYA_DOUBLE),
        workspace=str(tmp_path / "workspace"),
        accelerate_bin="accelerate",
        python=sys.executable,
        base_model=str(model),
        dataset_config=str(tmp_path / "dataset.toml"),
        output_dir=str(tmp_path / "out"),
        output_name="Test_Hero",
        logging_dir=None,
        tokenizer_cache_dir=str(tmp_path / "tokenizers"),
        extra_args=(),
        cpu=True,
        trigger="sks",
        job_id="job-1",
    )
    return Job(root=tmp_path, img=img, out=tmp_path / "out", launch=launch)


def test_happy_path_output_and_files(job: Job) -> None:
    record = job.root / "argv.json"
    argv = job.argv()
    res = job.run(argv, KOHYA_DOUBLE_RECORD=str(record))
    assert res.returncode == 0, res.stderr
    steps = total_steps(TINY, IMAGES)
    assert steps == 8
    out = res.stdout
    assert "running training / 学習開始" in out
    assert f"  total optimization steps / 学習ステップ数: {steps}\n" in out
    assert out.index("epoch 1/2") < out.index("epoch 2/2")
    epoch_file, final = job.out / "Test_Hero-000001.safetensors", job.out / "Test_Hero.safetensors"
    assert f"saving checkpoint: {epoch_file}\n" in out
    assert f"saving checkpoint: {final}\n" in out
    assert out.rstrip("\n").endswith("model saved.")
    assert f"\rsteps: 100%|██████████| {steps}/{steps} [" in res.stderr
    assert "avr_loss=" in res.stderr
    assert sorted(p.name for p in job.out.iterdir()) == [epoch_file.name, final.name]
    assert json.loads(record.read_text()) == argv[3:]


def test_lora_file_has_kohyas_layout_and_metadata(job: Job) -> None:
    assert job.run(job.argv()).returncode == 0
    with safe_open(str(job.out / "Test_Hero.safetensors"), framework="numpy") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in keys}
    assert keys and all(KEY.match(k) for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    for m in modules:
        down, up = tensors[f"{m}.lora_down.weight"], tensors[f"{m}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == TINY.network_dim
        assert tensors[f"{m}.alpha"].shape == () and float(tensors[f"{m}.alpha"]) == TINY.network_alpha
    assert {str(t.dtype) for t in tensors.values()} == {"float16"}
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_training_comment"] == "job=job-1; trigger=sks"
    assert meta["ss_max_train_steps"] == "8" and meta["ss_epoch"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.trigger_phrase"] == "sks" and meta["modelspec.title"] == "Test_Hero"


def test_unet_only_has_no_text_encoder_keys(job: Job) -> None:
    assert job.run(job.argv(dataclasses.replace(TINY, text_encoder_lr=0.0))).returncode == 0
    with safe_open(str(job.out / "Test_Hero.safetensors"), framework="numpy") as fh:
        keys = list(fh.keys())
    assert keys and not [k for k in keys if k.startswith("lora_te_")]


def test_accelerate_launch_argv_is_accepted_after_the_launcher(job: Job) -> None:
    # Run the script part of the accelerate form with our python: the flags after the script must parse.
    argv = job.argv(python=None)
    script_at = argv.index(str(KOHYA_DOUBLE))
    res = job.run([sys.executable, "-u", *argv[script_at:]])
    assert res.returncode == 0, res.stderr


def test_unknown_argument_exits_2_like_argparse(job: Job) -> None:
    res = job.run([*job.argv(), "--network_dimm", "8"])
    assert res.returncode == 2
    assert res.stderr.rstrip().endswith("train_network.py: error: unrecognized arguments: --network_dimm 8")
    assert res.stderr.startswith("usage: train_network.py")


def test_bad_argument_type_exits_2(job: Job) -> None:
    argv = job.argv()
    argv[argv.index("--network_dim") + 1] = "thirty"
    res = job.run(argv)
    assert res.returncode == 2
    assert "argument --network_dim: invalid int value: 'thirty'" in res.stderr


def test_empty_image_dir_logs_no_data_found_and_exits_0(job: Job) -> None:
    for f in job.img.iterdir():
        f.unlink()
    res = job.run(job.argv())
    assert res.returncode == 0  # as real kohya: the daemon must check for the LoRA file
    assert "No data found. Please verify arguments" in res.stdout
    assert "running training" not in res.stdout
    assert not job.out.exists()


def test_missing_image_dir_is_no_data_too(job: Job) -> None:
    argv = job.argv()
    write_dataset_config(
        Path(job.launch.dataset_config),
        dataset_config(image_dir=str(job.root / "nope"), class_tokens="sks", params=TINY),
    )
    res = job.run(argv)
    assert res.returncode == 0
    assert f"not directory: {job.root / 'nope'}" in res.stdout
    assert "No data found" in res.stdout


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (
            lambda c: c["datasets"][0].update(network_multiplier=1),
            "expected float for dictionary value @ data['datasets'][0]['network_multiplier']",
        ),
        (
            lambda c: c["datasets"][0]["subsets"][0].update(name="hero"),
            "extra keys not allowed @ data['datasets'][0]['subsets'][0]['name']",
        ),
        (
            lambda c: c["general"].update(batch_size="2"),
            "expected int for dictionary value @ data['general']['batch_size']",
        ),
        (lambda c: c.update(foo=1), "extra keys not allowed @ data['foo']"),
    ],
)
def test_invalid_dataset_config_fails_like_voluptuous(job: Job, mutate, error: str) -> None:
    argv = job.argv()
    cfg = dataset_config(image_dir=str(job.img), class_tokens="sks", params=TINY)
    mutate(cfg)
    write_dataset_config(Path(job.launch.dataset_config), cfg)
    res = job.run(argv)
    assert res.returncode == 1
    assert "Invalid user config / ユーザ設定の形式が正しくないようです" in res.stdout
    assert res.stderr.rstrip().endswith(f"voluptuous.error.MultipleInvalid: {error}")


def test_missing_model_fails_after_the_dataset_scan(job: Job) -> None:
    res = job.run(job.argv(base_model=str(job.root / "missing.safetensors")))
    assert res.returncode == 1
    assert "found directory" in res.stdout
    assert "is neither a valid local path nor a valid repo id" in res.stderr
    assert res.stderr.startswith("Traceback (most recent call last):")


def test_empty_caption_file_fails_the_run(job: Job) -> None:
    (job.img / "01.txt").write_text("")
    res = job.run(job.argv())
    assert res.returncode == 1
    assert "AssertionError: caption file is empty" in res.stderr


def test_missing_caption_falls_back_to_class_tokens_with_a_warning(job: Job) -> None:
    (job.img / "01.txt").unlink()
    res = job.run(job.argv())
    assert res.returncode == 0
    assert "No caption file found for 1 images" in res.stdout


def test_undecodable_image_fails_the_run(job: Job) -> None:
    (job.img / "02.png").write_bytes(b"not a png")
    res = job.run(job.argv())
    assert res.returncode == 1
    assert "cannot identify image file" in res.stderr


def test_offline_without_the_tokenizer_folder_fails(job: Job) -> None:
    (job.root / "tokenizers" / "openai_clip-vit-large-patch14").rmdir()
    res = job.run(job.argv())
    assert res.returncode == 1
    assert "TypeError: expected str, bytes or os.PathLike object, not NoneType" in res.stderr


def test_fail_oom_mid_training(job: Job) -> None:
    res = job.run(job.argv(), KOHYA_DOUBLE_FAIL="oom")
    assert res.returncode == 1
    assert "\rsteps:" in res.stderr
    assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate" in res.stderr
    assert not (job.out / "Test_Hero.safetensors").exists()
    assert "model saved." not in res.stdout


def test_fail_crash(job: Job) -> None:
    res = job.run(job.argv(), KOHYA_DOUBLE_FAIL="crash")
    assert res.returncode == 1
    assert "Traceback (most recent call last):" in res.stderr
    assert not (job.out / "Test_Hero.safetensors").exists()


def test_fail_no_output_exits_0_without_a_file(job: Job) -> None:
    res = job.run(job.argv(), KOHYA_DOUBLE_FAIL="no_output")
    assert res.returncode == 0
    assert "total optimization steps" in res.stdout
    assert "model saved." not in res.stdout
    assert not job.out.exists() or not list(job.out.iterdir())


def start(job: Job, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        job.argv(),
        cwd=job.root / "workspace",
        env=job.env(KOHYA_DOUBLE_STEP_SECONDS="0.2", **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        start_new_session=True,
    )


def read_until(proc: subprocess.Popen[str], pattern: str) -> re.Match[str]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"{pattern!r} never appeared")


def gone(pid: int, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_kills_it_like_the_real_one(job: Job) -> None:
    proc = start(job)
    try:
        read_until(proc, r"^epoch 1/2")
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM  # 143 in a shell: no handler, no traceback
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert not (job.out / "Test_Hero.safetensors").exists()


def test_group_kill_takes_the_grandchild_too(job: Job) -> None:
    proc = start(job, KOHYA_DOUBLE_SPAWN_CHILD="1")
    try:
        child = int(read_until(proc, r"^double child pid: (\d+)").group(1))
        assert psutil.Process(child).ppid() == proc.pid
        assert os.getpgid(child) == proc.pid  # same group as the double, which leads its own session
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        assert gone(child)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_killing_only_the_double_leaves_the_grandchild(job: Job) -> None:
    # Why the daemon must signal the process group: the same trap as `accelerate launch` (fixture 22).
    proc = start(job, KOHYA_DOUBLE_SPAWN_CHILD="1")
    child = int(read_until(proc, r"^double child pid: (\d+)").group(1))
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        time.sleep(0.2)
        assert psutil.Process(child).is_running()
        assert psutil.Process(child).status() != psutil.STATUS_ZOMBIE
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert gone(child)
