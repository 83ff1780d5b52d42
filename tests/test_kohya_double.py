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
from tests.helpers import KOHYA_DOUBLE, KOHYA_SDXL_DOUBLE, REPO, write_sd1_checkpoint, write_sdxl_checkpoint

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
    # with the epoch file, kohya's saved state (--save_state), and the final state (FACTS.md §3)
    assert sorted(p.name for p in job.out.iterdir()) == [
        "Test_Hero-000001-state", epoch_file.name, "Test_Hero-state", final.name]
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


# -------------------------------------------------------------------------------------------- SDXL
# Held to the real SDXL runs in ../shared/kohya-logs/cpu-sdxl (sd-scripts 48d368fa): the same line skeleton as
# run 01 and, for each failure the daemon can meet, the same last lines as the real run.
SDXL_LOGS = Path(os.environ.get("KOHYA_LOGS_DIR", REPO.parent / "shared" / "kohya-logs")) / "cpu-sdxl"
# Run 01's settings where they show in the output: dim 4, alpha 1, AdamW, fp32, 2 epochs saving each, U-Net only
# with cached text-encoder outputs and gradient checkpointing.
SDXL_TINY = dataclasses.replace(TINY, arch="sdxl", network_alpha=1.0, text_encoder_lr=0.0,
                                cache_text_encoder_outputs=True, gradient_checkpointing=True)
SDXL_KEY = re.compile(r"^lora_(unet|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
# The lines that say what phase the trainer is in, as the daemon's parser and the user read them.
SKELETON = re.compile(
    r"^(load tokenizer from cache: |load StableDiffusion checkpoint: |building |loading |U-Net: |text encoder \d: "
    r"|VAE: |caching |checking cache |move vae |import network |create LoRA|neuron dropout|enable LoRA|prepare "
    r"|use \w+ optimizer|running training|unet dtype|text_encoder \[|epoch \d+/\d+$|saving checkpoint: |model saved)"
)


def real_log(run: str, name: str) -> str:
    matches = sorted(SDXL_LOGS.glob(f"{run}_*/{name}"))
    if not matches:
        pytest.skip(f"real SDXL logs not found in {SDXL_LOGS} (set KOHYA_LOGS_DIR)")
    return matches[0].read_text(encoding="utf-8")


def skeleton(stdout: str) -> list[str]:
    """The phase lines of a run, with what differs between machines and jobs (paths, names) taken out."""
    out = []
    for line in stdout.splitlines():
        if not SKELETON.match(line):
            continue
        head, sep, path = line.partition(": /")
        if sep and head in ("load tokenizer from cache", "load StableDiffusion checkpoint", "saving checkpoint"):
            name = path.rsplit("/", 1)[-1]
            if head == "saving checkpoint":
                name = re.sub(r"^.*?(-\d{6})?\.safetensors$", r"NAME\1.safetensors", name)
            elif head == "load StableDiffusion checkpoint":
                name = "MODEL"
            line = f"{head}: {name}"
        out.append(line)
    return out


def last_line(text: str) -> str:
    return text.rstrip("\n").rsplit("\n", 1)[-1]


@pytest.fixture
def xl(job: Job) -> Job:
    """The job fixture for sdxl_train_network.py: an SDXL checkpoint and both tokenizer folders."""
    (job.root / "tokenizers" / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k").mkdir()
    model = write_sdxl_checkpoint(job.root / "models" / "sdxl.safetensors")
    launch = dataclasses.replace(job.launch, script_path=str(KOHYA_SDXL_DOUBLE), base_model=str(model))
    return dataclasses.replace(job, launch=launch)


def test_sdxl_output_has_the_real_runs_skeleton(xl: Job) -> None:
    res = xl.run(xl.argv(SDXL_TINY))
    assert res.returncode == 0, res.stderr
    assert skeleton(res.stdout) == skeleton(real_log("01", "stdout.log"))
    # the text-encoder caching phase draws its own unnamed bar on stderr before the steps bar, as the real one
    assert res.stderr.index(f"| {IMAGES}/{IMAGES} [") < res.stderr.index("\rsteps:")


def test_sdxl_unet_only_lora_has_the_real_layout(xl: Job) -> None:
    assert xl.run(xl.argv(SDXL_TINY)).returncode == 0
    with safe_open(str(xl.out / "Test_Hero.safetensors"), framework="numpy") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
        dtypes = {str(fh.get_tensor(k).dtype) for k in keys}
    assert keys and all(SDXL_KEY.match(k) and k.startswith("lora_unet_") for k in keys)
    # SGM block names, as in the real file's keys
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert dtypes == {"float16"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["ss_gradient_checkpointing"] == "True" and meta["ss_text_encoder_lr"] == "None"
    assert meta["modelspec.trigger_phrase"] == "sks" and meta["ss_training_comment"] == "job=job-1; trigger=sks"


def test_sdxl_with_the_text_encoders_trained_has_te1_and_te2_keys(xl: Job) -> None:
    params = dataclasses.replace(SDXL_TINY, cache_text_encoder_outputs=False, text_encoder_lr=5e-5)
    res = xl.run(xl.argv(params))
    assert res.returncode == 0, res.stderr
    assert "caching Text Encoder outputs" not in res.stdout
    assert res.stdout.index("enable LoRA for text encoder: 264 modules") < res.stdout.index(
        "enable LoRA for U-Net: 722 modules")
    with safe_open(str(xl.out / "Test_Hero.safetensors"), framework="numpy") as fh:
        keys = list(fh.keys())
    prefixes = {k.split("_", 2)[1] for k in keys}
    assert prefixes == {"unet", "te1", "te2"}


def test_caching_text_encoder_outputs_while_training_them_fails_like_run_12(xl: Job) -> None:
    argv = xl.argv(SDXL_TINY)
    argv.remove("--network_train_unet_only")
    res = xl.run(argv)
    assert res.returncode == 1
    assert last_line(res.stderr) == last_line(real_log("12", "stderr.log"))
    assert last_line(res.stdout).startswith("mean ar error")  # after the dataset scan, before the model load


def test_shuffled_captions_cannot_be_cached(xl: Job) -> None:
    argv = xl.argv(SDXL_TINY)
    cfg = dataset_config(image_dir=str(xl.img), class_tokens="sks", params=SDXL_TINY)
    cfg["general"]["shuffle_caption"] = True
    write_dataset_config(Path(xl.launch.dataset_config), cfg)
    res = xl.run(argv)
    assert res.returncode == 1
    assert last_line(res.stderr).startswith("AssertionError: when caching Text Encoder output, either "
                                            "caption_dropout_rate, shuffle_caption")


def test_bucket_steps_must_be_divisible_by_32(xl: Job) -> None:
    argv = xl.argv(SDXL_TINY)
    cfg = dataset_config(image_dir=str(xl.img), class_tokens="sks", params=SDXL_TINY)
    cfg["general"].update(bucket_reso_steps=48, min_bucket_reso=48, max_bucket_reso=192)
    write_dataset_config(Path(xl.launch.dataset_config), cfg)
    res = xl.run(argv)
    assert res.returncode == 1
    assert "AssertionError: bucket_reso_steps is 48. it must be divisible by 32." in res.stderr


@pytest.mark.parametrize("trap", [["--text_encoder_lr1", "1e-5"], ["--blocks_to_swap", "4"]])
def test_flags_the_sdxl_script_does_not_have_exit_2(xl: Job, trap: list[str]) -> None:
    res = xl.run([*xl.argv(SDXL_TINY), *trap])
    assert res.returncode == 2
    assert res.stderr.rstrip().endswith(f"sdxl_train_network.py: error: unrecognized arguments: {' '.join(trap)}")


def test_an_sd1_checkpoint_fails_the_sdxl_script_like_run_10(xl: Job) -> None:
    res = xl.run(xl.argv(SDXL_TINY, base_model=str(xl.root / "models" / "sd15.safetensors")))
    assert res.returncode == 1
    real_out, real_err = real_log("10", "stdout.log"), real_log("10", "stderr.log")
    assert last_line(res.stdout) == last_line(real_out) == "loading U-Net from checkpoint"
    error = "RuntimeError: Error(s) in loading state_dict for SdxlUNet2DConditionModel:"
    assert error in real_err.splitlines() and error in res.stderr.splitlines()
    assert res.stderr.split(error + "\n", 1)[1].startswith("\tUnexpected key(s) in state_dict: ")


def test_an_sdxl_checkpoint_fails_the_sd1_script_like_run_11(job: Job) -> None:
    model = write_sdxl_checkpoint(job.root / "models" / "sdxl.safetensors")
    res = job.run(job.argv(base_model=str(model)))
    assert res.returncode == 1
    real_out, real_err = real_log("11", "stdout.log"), real_log("11", "stderr.log")
    assert last_line(res.stdout) == last_line(real_out) == "UNet2DConditionModel: 64, 8, 768, False, False"
    error = "RuntimeError: Error(s) in loading state_dict for UNet2DConditionModel:"
    assert error in real_err.splitlines() and error in res.stderr.splitlines()
    assert "\tsize mismatch for " in res.stderr


def test_offline_without_the_bigg_tokenizer_fails_like_run_13(xl: Job) -> None:
    (xl.root / "tokenizers" / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k").rmdir()
    res = xl.run(xl.argv(SDXL_TINY))  # the daemon's env with a cache dir: HF_HUB_OFFLINE=1
    assert res.returncode == 1
    real_out = real_log("13", "stdout.log")
    assert [ln.rsplit("/", 1)[-1] for ln in res.stdout.splitlines()] == \
        [ln.rsplit("/", 1)[-1] for ln in real_out.splitlines()] == ["openai_clip-vit-large-patch14"]
    assert last_line(res.stderr) == last_line(real_log("13", "stderr.log"))


def test_fp8_base_without_mixed_precision_fails_late_like_run_14(xl: Job) -> None:
    res = xl.run([*xl.argv(SDXL_TINY), "--fp8_base"])
    assert res.returncode == 1
    assert last_line(res.stdout) == last_line(real_log("14", "stdout.log")) == "use AdamW optimizer | {}"
    assert last_line(res.stderr) == last_line(real_log("14", "stderr.log"))
    assert "caching Text Encoder outputs..." in res.stdout  # the whole start-up was spent first


def test_sdxl_double_keeps_the_knobs(xl: Job) -> None:
    record = xl.root / "xl-argv.json"
    argv = xl.argv(SDXL_TINY)
    res = xl.run(argv, KOHYA_DOUBLE_FAIL="oom", KOHYA_DOUBLE_RECORD=str(record))
    assert res.returncode == 1 and "torch.OutOfMemoryError: CUDA out of memory." in res.stderr
    assert json.loads(record.read_text()) == argv[3:]
    res = xl.run(argv, KOHYA_DOUBLE_LORA_MB="2")
    assert res.returncode == 0 and (xl.out / "Test_Hero.safetensors").stat().st_size > 2 * 2**20
