"""The contract with kohya-ss sd-scripts `train_network.py` / `sdxl_train_network.py`: argv, environment and
dataset config.

Pure apart from write_dataset_config. Flag names, the dataset schema's strict types and the environment
follow sd-scripts 48d368fa (v0.10.x) and were run end to end against the real trainer
(tests/fixtures/real_kohya_proof.md; SDXL: ../shared/kohya-logs/cpu-sdxl). Every SDXL flag below is one that
sdxl_train_network.setup_parser() knows at that commit and that does something for a LoRA.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from daemon.pipeline.buckets import BUCKET_STEP
from daemon.pipeline.dataset import MAX_ASPECT, MIN_SIDE
from daemon.pipeline.params import TrainParams

NETWORK_MODULE = "networks.lora"
CAPTION_EXTENSION = ".txt"  # kohya's default is ".caption"; the dot is required
# Kohya's cosine warmup accepts a float < 1 as a fraction of the total steps.
LR_WARMUP_FRACTION = "0.05"
# accelerate's default would be every core; one training process gains little from more than two.
ACCELERATE_CPU_THREADS = "2"
# Ancestral Euler gives a recognisable picture in few steps; kohya's default ddim needs more.
SAMPLE_SAMPLER = "euler_a"
SAMPLE_STEPS_GPU = 24
SAMPLE_STEPS_CPU = 12
# The SDXL trainer lives beside train_network.py in the same sd-scripts folder.
SDXL_SCRIPT = "sdxl_train_network.py"
# Precisions with autocast; kohya asserts one of them for --fp8_base (train_network.py L829-833).
FP8_PRECISIONS = ("fp16", "bf16")


@dataclass(frozen=True)
class KohyaLaunch:
    """Where things are for one run; everything path-like is absolute."""

    script_path: str  # <sd-scripts>/train_network.py
    workspace: str  # the sd-scripts root: the cwd, so `networks.lora` and `library` import
    accelerate_bin: str
    python: str | None  # kohya's venv python; when set, run the script directly instead of accelerate
    base_model: str
    dataset_config: str
    output_dir: str
    output_name: str
    logging_dir: str | None
    tokenizer_cache_dir: str | None
    extra_args: tuple[str, ...]
    cpu: bool
    trigger: str
    job_id: str
    sample_prompts: str | None = None  # kohya prompt file; previews are made only when this is set
    # A run that continues from a saved state (train_state.py): the state folder and the first epoch to train.
    resume_state: str | None = None
    initial_epoch: int | None = None


def script_for(arch: str, train_network: Path) -> Path:
    """The trainer script for a base model's family; `train_network` is the configured train_network.py."""
    return train_network.parent / SDXL_SCRIPT if arch == "sdxl" else train_network


def lever_problem(params: TrainParams) -> str | None:
    """Why kohya would refuse this combination of levers (its own asserts), or None when it is fine.

    Checked before a run: kohya asserts this only after loading the whole model (76 s on a CPU, run 14 of
    ../shared/kohya-logs/cpu-sdxl). The text-encoder-caching assert (run 12) cannot happen: build_command
    always pairs --cache_text_encoder_outputs with --network_train_unet_only and an unshuffled dataset.
    """
    if params.fp8_base and params.mixed_precision not in FP8_PRECISIONS:
        return (f"fp8_base needs mixed_precision fp16 or bf16, not {params.mixed_precision} "
                "(kohya: fp8_base requires mixed precision='fp16' or 'bf16').")
    return None


def build_command(params: TrainParams, launch: KohyaLaunch) -> list[str]:
    """The argv to exec (never through a shell)."""
    return [*_launcher(params, launch), launch.script_path, *_script_args(params, launch)]


def caches_text_encoder_outputs(params: TrainParams) -> bool:
    """SDXL with --cache_text_encoder_outputs (train_network.py has no such option: SD 1.x ignores the field)."""
    return params.arch == "sdxl" and params.cache_text_encoder_outputs


def unet_only(params: TrainParams) -> bool:
    """Whether the text encoders get no LoRA: lr 0, or SDXL's cached text-encoder outputs (kohya asserts
    --network_train_unet_only with --cache_text_encoder_outputs: the encoders are freed after caching)."""
    return params.text_encoder_lr <= 0 or caches_text_encoder_outputs(params)


def _launcher(params: TrainParams, launch: KohyaLaunch) -> list[str]:
    if launch.python:
        # Single process anyway; running python directly keeps the script's own exit code (accelerate
        # turns every failure into 1) and leaves no launcher parent whose death would orphan the trainer.
        return [launch.python, "-u"]
    argv = [
        launch.accelerate_bin,
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        # Passing every value accelerate would otherwise default silences its "values were not passed"
        # warning and makes the run independent of any `accelerate config` file on the machine.
        "--mixed_precision",
        params.mixed_precision,
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        ACCELERATE_CPU_THREADS,
    ]
    if launch.cpu:
        argv.append("--cpu")
    return argv


def _script_args(params: TrainParams, launch: KohyaLaunch) -> list[str]:
    args = [
        "--pretrained_model_name_or_path",
        launch.base_model,
        "--dataset_config",
        launch.dataset_config,
        "--output_dir",
        launch.output_dir,
        # Values derived from what the user typed are glued to their flag: argparse never reads them as options.
        f"--output_name={launch.output_name}",
        "--save_model_as",
        "safetensors",
        # Without it the LoRA is saved in the training dtype (fp32 on CPU): twice the size, no gain.
        "--save_precision",
        "fp16",
        "--network_module",
        NETWORK_MODULE,
        "--network_dim",
        str(params.network_dim),
        "--network_alpha",
        _num(params.network_alpha),
        # kohya's --learning_rate default (2e-6) is a fine-tune value; it is also the fallback for any
        # parameter group without its own lr, so set it to the U-Net rate.
        "--learning_rate",
        _num(params.unet_lr),
        "--unet_lr",
        _num(params.unet_lr),
    ]
    if not unet_only(params):
        # For SDXL one value serves both text encoders (networks.lora applies the first to both);
        # --text_encoder_lr1/2 from kohya's docs do not exist.
        args += ["--text_encoder_lr", _num(params.text_encoder_lr)]
    else:
        # Skips creating the text-encoder LoRA modules altogether (smaller file, less VRAM) instead of
        # creating them and freezing them with lr 0.
        args.append("--network_train_unet_only")
    args += ["--optimizer_type", params.optimizer, *_optimizer_args(params.optimizer)]
    args += ["--lr_scheduler", "cosine", "--lr_warmup_steps", LR_WARMUP_FRACTION]
    args += ["--max_train_epochs", str(params.epochs)]
    if params.save_every_n_epochs > 0:
        # With each epoch file kohya also saves its training state (optimizer, scheduler, RNG), the point a
        # run can be resumed from; only the newest is kept, so the disk holds one state during the run
        # (tests/fixtures/kohya_resume/FACTS.md §1-3). kohya also writes a final `<name>-state`.
        args += ["--save_every_n_epochs", str(params.save_every_n_epochs),
                 "--save_state", "--save_last_n_epochs_state", "1"]
    if launch.resume_state is not None:
        # --initial_epoch always: a state written by a resumed run records a relative step count, from which
        # kohya alone would pick the wrong epoch to start (FACTS §4.4.2, runs f and g).
        args += ["--resume", launch.resume_state, "--initial_epoch", str(launch.initial_epoch)]
    if params.sample_every_n_epochs > 0 and launch.sample_prompts:
        args += [
            "--sample_prompts",
            launch.sample_prompts,
            "--sample_every_n_epochs",
            str(params.sample_every_n_epochs),
            "--sample_sampler",
            SAMPLE_SAMPLER,
        ]
    args += [
        # The script hands this to Accelerator() itself; accelerate's own setting is ignored.
        "--mixed_precision",
        params.mixed_precision,
        "--seed",
        str(params.seed),
        # With --cache_latents a batch is in-memory tensors plus tokenising a caption: worker processes
        # would only add start-up time and more children to clean up on cancel.
        "--max_data_loader_n_workers",
        "0",
        "--cache_latents",
    ]
    if not launch.cpu:
        # Memory-efficient attention on CUDA; on a CPU it is ~4x slower than kohya's own attention.
        args.append("--sdpa")
    if params.gradient_checkpointing:
        # Recomputes activations in the backward pass: ~30-50% slower, far less memory. Chosen by the memory
        # tier (fit.py): SD1.5 at 512 px fits most cards without it, SDXL at 1024 px few do.
        args.append("--gradient_checkpointing")
    if params.arch == "sdxl":
        args += _sdxl_args(params)
    if params.fp8_base:
        # The frozen base model as float8_e4m3fn: about half its VRAM, for the smallest cards (generic in
        # train_network, so SDXL and SD 1.x alike).
        args.append("--fp8_base")
    # Plain log lines on stdout instead of rich's 80-column wrapped layout on stderr: parseable.
    args.append("--console_log_simple")
    if launch.tokenizer_cache_dir:
        # Makes the CLIP tokenizer load from disk: the only thing kohya would otherwise download.
        args += ["--tokenizer_cache_dir", launch.tokenizer_cache_dir]
    if launch.logging_dir:
        args += ["--logging_dir", launch.logging_dir]
    args += [
        f"--training_comment=job={launch.job_id}; trigger={launch.trigger}",
        f"--metadata_trigger_phrase={launch.trigger}",
        f"--metadata_title={launch.output_name}",
    ]
    return [*args, *launch.extra_args]


def _sdxl_args(params: TrainParams) -> list[str]:
    """The SDXL-only levers (train_network.py has no --cache_text_encoder_outputs: an SD 1.x run ignores the
    field). Left out on purpose: --fused_backward_pass (parsed, but only the full fine-tune uses it),
    --blocks_to_swap and --cpu_offload_checkpointing (DiT scripts only), --text_encoder_lr1/2 (no such flags)."""
    args: list[str] = []
    if params.cache_text_encoder_outputs:
        # Both text encoders run once over the captions and their outputs are kept: no text-encoder
        # forward pass per step and ~1.6 GB less VRAM. --network_train_unet_only is already in the argv.
        args.append("--cache_text_encoder_outputs")
    if params.mixed_precision == "fp16":
        # SDXL's VAE overflows in fp16 (NaN latents); it runs in fp32 once, while the latents are cached.
        args.append("--no_half_vae")
    return args


def _optimizer_args(optimizer: str) -> list[str]:
    if optimizer == "Adafactor":
        # kohya's Adafactor defaults to relative_step=True, which discards unet_lr / text_encoder_lr and
        # replaces the scheduler; these make it honour the rates we pass.
        return ["--optimizer_args", "scale_parameter=False", "relative_step=False", "warmup_init=False"]
    return []


def _num(value: float) -> str:
    # repr round-trips exactly and argparse's float() reads every form it produces (1e-05, 16.0).
    return repr(float(value))


def build_env(base: Mapping[str, str], *, tokenizer_cache_dir: str | None, cpu: bool) -> dict[str, str]:
    """The trainer's environment: `base` (usually os.environ) plus what kohya needs to run unattended."""
    env = dict(base)
    env.update(
        {
            # Progress must arrive as it happens, not in 8 KiB blocks when the pipe buffer fills.
            "PYTHONUNBUFFERED": "1",
            # kohya prints Japanese text; a cp1252 pipe on Windows would raise UnicodeEncodeError.
            "PYTHONIOENCODING": "utf-8",
            "PYTHONUTF8": "1",
            # Log lines printed through rich before --console_log_simple takes effect stay unwrapped.
            "COLUMNS": "1000",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
    )
    if tokenizer_cache_dir:
        # With the tokenizer on disk nothing else needs the network; fail fast instead of hanging.
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def _prompt_text(text: str) -> str:
    """User text made inert in kohya's prompt file: one line, and no ' --' (kohya splits options on it)."""
    flat = " ".join(text.split())
    return re.sub(r"(^|\s)-+", r"\1", flat)


def sample_prompt_file(*, trigger: str, class_token: str, params: TrainParams, cpu: bool) -> str:
    """kohya's `--sample_prompts` text: one preview of the character, seeded so epochs compare."""
    steps = SAMPLE_STEPS_CPU if cpu else SAMPLE_STEPS_GPU
    size = params.resolution
    return (
        f"{_prompt_text(trigger)} {_prompt_text(class_token)}, portrait, looking at viewer --n lowres, blurry"
        f" --w {size} --h {size} --d {params.seed} --s {steps} --l 7\n"
    )


def dataset_config(*, image_dir: str, class_tokens: str, params: TrainParams) -> dict[str, Any]:
    """The `--dataset_config` document.

    kohya validates it with a strict voluptuous schema: no unknown keys, ints must be ints and floats must
    be floats (an int where a float is expected fails the run).
    """
    # Cached text-encoder outputs are one encoding per caption: kohya asserts no shuffling (nor caption
    # dropout or token warmup, which we never set) with them (SdxlNetworkTrainer.assert_extra_args).
    shuffle = not caches_text_encoder_outputs(params)
    return {
        "general": {
            "caption_extension": CAPTION_EXTENSION,
            # Keep the trigger word (first comma-separated token) in front; shuffle the rest so no tag
            # order is learned as part of the character.
            "shuffle_caption": shuffle,
            "keep_tokens": 1,
            "resolution": int(params.resolution),
            "batch_size": int(params.batch_size),
            **bucket_settings(params.resolution),
        },
        "datasets": [
            {
                "subsets": [
                    {
                        "image_dir": image_dir,
                        "num_repeats": int(params.repeats),
                        # The fallback caption for an image without a .txt file.
                        "class_tokens": class_tokens,
                    }
                ]
            }
        ],
    }


def bucket_settings(resolution: int) -> dict[str, Any]:
    """kohya's aspect-ratio buckets for pictures prep scaled to at most resolution² (buckets.py mirrors them).

    With bucket_no_upscale kohya derives each bucket from the picture's own size (rounded down to the step) and
    never enlarges a small picture. It then ignores min/max_bucket_reso (and says so in a warning), but still
    asserts min <= resolution <= max: they are set to the range our pictures really span.
    """
    longest = math.ceil(math.sqrt(MAX_ASPECT) * resolution / BUCKET_STEP) * BUCKET_STEP
    return {
        "enable_bucket": True,  # bucket_no_upscale does nothing without it
        "bucket_no_upscale": True,
        "bucket_reso_steps": BUCKET_STEP,
        "min_bucket_reso": MIN_SIDE,
        "max_bucket_reso": max(longest, int(resolution)),
    }


def write_dataset_config(path: Path, config: Mapping[str, Any]) -> None:
    """Write the TOML atomically: kohya must never read a half-written file from an earlier attempt."""
    data = tomli_w.dumps(dict(config)).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
