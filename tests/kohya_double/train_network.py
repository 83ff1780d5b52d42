"""TEST DOUBLE of kohya-ss sd-scripts `train_network.py` -- NOT the real trainer, trains nothing.

The only stand-in for kohya the tests may use. It is run exactly like the real script
(`python -u tests/kohya_double/train_network.py <kohya CLI>`, cwd = any workspace) and keeps the real
script's observable contract, as recorded from sd-scripts 48d368fa in /work/shared/kohya-logs/cpu:

- argparse with kohya's option names and types (the subset the daemon uses plus common ones); an unknown
  option exits 2 with `train_network.py: error: unrecognized arguments: ...`;
- `--dataset_config` is validated against kohya's strict schema (unknown keys, wrong types: ints are not
  floats) -> `Invalid user config / ...` and a voluptuous-style error, exit 1;
- the tokenizer: `--tokenizer_cache_dir D` needs `D/openai_clip-vit-large-patch14` when HF_HUB_OFFLINE=1;
- no images -> the real `No data found. ...` error line and exit **0**; an empty caption file -> the
  real assertion, exit 1; an image Pillow cannot decode -> exit 1 while "caching latents";
- a missing model path -> diffusers' ValueError traceback, exit 1 (after the dataset was scanned);
- aspect-ratio buckets as kohya makes them (enable_bucket, bucket_no_upscale, min/max_bucket_reso and their
  asserts, bucket_reso_steps), printed as kohya prints them (`bucket 0: resolution (512, 384), count: 20`);
- output like `--console_log_simple` runs: the `running training / 学習開始` block with
  `total optimization steps / 学習ステップ数: N` (N = sum over buckets of ceil(images*repeats/batch), times
  epochs), `epoch e/N`,
  tqdm `steps:` bars on stderr drawn with `\\r`, `saving checkpoint: <path>`, `model saved.`;
- checkpoints `<name>-<epoch:06d>.safetensors` per --save_every_n_epochs (not for the last epoch) and
  `<output_dir>/<output_name>.safetensors`: a small LoRA with kohya's real key layout and `ss_*` /
  `modelspec.*` metadata, written before `model saved.` is printed;
- SIGTERM kills it (no handler: exit -15 / 143, nothing saved), like the real one;
- `--save_state`: with each epoch file a `<name>-<epoch:06d>-state/` folder with the real file names, written in
  accelerate's order (`train_state.json` first, `random_states_0.pkl` last; `train_state.json` holds the
  launch's own step count), the state `--save_last_n_epochs_state` epochs back removed (`removing old state:`),
  and a final `<name>-state` (`saving last state.`); `--resume DIR` as sd-scripts does it (a missing folder:
  accelerate's ValueError, exit 1; a missing model/optimizer/scheduler file: FileNotFoundError, exit 1; no
  random states: `Could not load random states` and on), `--initial_epoch` overriding the state's step, the
  start epoch = steps // batches per epoch, the bar from 0 with the full total, `ss_steps` of the launch only,
  and the assert when nothing is left to train (tests/fixtures/kohya_resume/FACTS.md, runs b-h);
- given an SDXL checkpoint (header keys `conditioner.embedders.*`) it fails at the model load like the real one
  (`RuntimeError: Error(s) in loading state_dict for UNet2DConditionModel:`, run 11 of kohya-logs/cpu-sdxl).

Everything that differs for SD 1.x and SDXL is in `Sd1Model`; sdxl_train_network.py beside this file subclasses
it (as the real SdxlNetworkTrainer subclasses NetworkTrainer) and calls main() with its own.

Knobs (environment):
  KOHYA_DOUBLE_STEP_SECONDS  sleep per optimisation step (default 0.01)
  KOHYA_DOUBLE_FAIL          oom   -> the CUDA out-of-memory traceback mid-training, exit 1
                             crash -> a generic traceback mid-training, exit 1
                             no_output -> trains, then exits 0 without saving anything
  KOHYA_DOUBLE_OOM_ABOVE_BATCH=N   run out of memory when the batch size (the dataset's batch_size) is above N
  KOHYA_DOUBLE_OOM_WITHOUT_CHECKPOINTING=1  run out of memory unless --gradient_checkpointing is given
                             (the two may be combined: either condition is enough). On a GPU run it is torch's
                             CUDA out-of-memory traceback, on a CPU run (ACCELERATE_USE_CPU) torch's
                             DefaultCPUAllocator one; both exit 1, at the first optimisation step, where a real
                             run reaches its peak memory, or at step KOHYA_DOUBLE_OOM_AT_STEP=<n> (default 1,
                             counted in this process), so a test can run out after an epoch was saved
  KOHYA_DOUBLE_RECORD=<path> write the arguments (sys.argv[1:]) as a JSON list before parsing anything
  KOHYA_DOUBLE_SPAWN_CHILD=1 start a sleeping grandchild in the same process group and print
                             `double child pid: N`, so tests can prove the whole tree gets killed
                             (=own_session: the grandchild starts its own session, as a tool that
                             daemonises does; only the remembered descendants lead to it)
  KOHYA_DOUBLE_LORA_MB=N     pad every saved LoRA with zero U-Net modules to about N MiB (a real SD1.5
                             LoRA is 10-150 MiB), so tests can catch the daemon while it copies one
  KOHYA_DOUBLE_FLOOD_MB=<n>  before training, print n MB of kohya-shaped INFO log lines as fast as the pipe
                             takes them (a chatty trainer), then train and save as usual
  KOHYA_DOUBLE_CACHE_SECONDS=<s>   time each picture takes while latents are cached (default 0): the unnamed
                             caching bar is redrawn once per picture, as kohya's is
  KOHYA_DOUBLE_STATE_SECONDS=<s>   time saving one state takes, between its model and its last file (default 0),
                             so tests can kill the trainer while a state is half written
  KOHYA_DOUBLE_SAMPLE_SECONDS=<s>  time each preview picture takes (default 0): its 4-step sampler bar is
                             drawn over that time, as kohya's inference bar is; the steps bar is unpaused
                             after the previews, as sd-scripts does, so they do not count in its rate
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

CLIP_L = "openai/clip-vit-large-patch14"
TOKENIZER_DIR = CLIP_L.replace("/", "_")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OPTIMIZER_LABELS = {
    "adamw": ("AdamW", "torch.optim.adamw.AdamW"),
    "adamw8bit": ("8-bit AdamW", "bitsandbytes.optim.adamw.AdamW8bit"),
    "adafactor": ("Adafactor", "transformers.optimization.Adafactor"),
    "lion": ("Lion", "lion_pytorch.lion_pytorch.Lion"),
    "prodigy": ("Prodigy", "prodigyopt.prodigy.Prodigy"),
}
NO_DATA = (
    "No data found. Please verify arguments (train_data_dir must be the parent of folders with images) / "
    "画像がありません。引数指定を確認してください（train_data_dirには画像があるフォルダではなく、"
    "画像があるフォルダの親フォルダを指定する必要があります）"
)


# ----------------------------------------------------------------------------------------------- CLI
def int_or_float(value: str) -> int | float:
    # kohya's --lr_warmup_steps type: a float < 1 is a fraction of the total steps.
    number = float(value)
    return int(value) if number >= 1 else number


def build_parser() -> argparse.ArgumentParser:
    # Same defaults as kohya where behaviour depends on them; prog comes from argv[0] (train_network.py).
    p = argparse.ArgumentParser()
    add = p.add_argument
    flag = {"action": "store_true"}
    add("--console_log_level", type=str, default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    add("--console_log_file", type=str, default=None)
    add("--console_log_simple", **flag)
    add("--v2", **flag)
    add("--v_parameterization", **flag)
    add("--pretrained_model_name_or_path", type=str, default=None)
    add("--tokenizer_cache_dir", type=str, default=None)
    for name in ("title", "author", "description", "license", "tags", "trigger_phrase", "usage_hint"):
        add(f"--metadata_{name}", type=str, default=None)
    add("--train_data_dir", type=str, default=None)
    add("--reg_data_dir", type=str, default=None)
    add("--dataset_config", type=str, default=None)
    add("--resolution", type=str, default=None)
    add("--caption_extension", type=str, default=".caption")
    add("--shuffle_caption", **flag)
    add("--caption_dropout_rate", type=float, default=0.0)
    add("--caption_dropout_every_n_epochs", type=int, default=0)
    add("--caption_tag_dropout_rate", type=float, default=0.0)
    add("--token_warmup_min", type=int, default=1)
    add("--token_warmup_step", type=float, default=0)
    add("--keep_tokens", type=int, default=0)
    add("--flip_aug", **flag)
    add("--color_aug", **flag)
    add("--enable_bucket", **flag)
    add("--min_bucket_reso", type=int, default=256)
    add("--max_bucket_reso", type=int, default=1024)
    add("--bucket_reso_steps", type=int, default=64)
    add("--bucket_no_upscale", **flag)
    add("--cache_latents", **flag)
    add("--cache_latents_to_disk", **flag)
    add("--vae_batch_size", type=int, default=1)
    add("--output_dir", type=str, default=None)
    add("--output_name", type=str, default=None)
    add("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    add("--save_every_n_epochs", type=int, default=None)
    add("--sample_prompts", type=str, default=None)
    add("--sample_every_n_epochs", type=int, default=None)
    add("--sample_every_n_steps", type=int, default=None)
    add("--sample_at_first", **flag)
    add(
        "--sample_sampler",
        type=str,
        default="ddim",
        choices=["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                 "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"],
    )
    add("--save_every_n_steps", type=int, default=None)
    add("--save_last_n_epochs", type=int, default=None)
    add("--save_state", **flag)
    add("--save_state_on_train_end", **flag)
    add("--save_last_n_epochs_state", type=int, default=None)
    add("--resume", type=str, default=None)
    add("--initial_epoch", type=int, default=None)
    add("--initial_step", type=int, default=None)
    add("--skip_until_initial_step", **flag)
    add("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"])
    add("--train_batch_size", type=int, default=1)
    add("--max_token_length", type=int, default=None, choices=[None, 150, 225])
    add("--mem_eff_attn", **flag)
    add("--xformers", **flag)
    add("--sdpa", **flag)
    add("--max_train_steps", type=int, default=1600)
    add("--max_train_epochs", type=int, default=None)
    add("--max_data_loader_n_workers", type=int, default=8)
    add("--persistent_data_loader_workers", **flag)
    add("--seed", type=int, default=None)
    add("--gradient_checkpointing", **flag)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    add("--full_fp16", **flag)
    add("--full_bf16", **flag)
    add("--fp8_base", **flag)
    add("--fp8_base_unet", **flag)
    add("--no_half_vae", **flag)
    add("--lowram", **flag)
    add("--highvram", **flag)
    add("--fused_backward_pass", **flag)
    add("--clip_skip", type=int, default=None)
    add("--logging_dir", type=str, default=None)
    add("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"])
    add("--log_prefix", type=str, default=None)
    add("--noise_offset", type=float, default=None)
    add("--min_snr_gamma", type=float, default=None)
    add("--optimizer_type", type=str, default="")
    add("--learning_rate", type=float, default=2.0e-6)
    add("--max_grad_norm", type=float, default=1.0)
    add("--optimizer_args", type=str, default=None, nargs="*")
    add("--lr_scheduler", type=str, default="constant")
    add("--lr_warmup_steps", type=int_or_float, default=0)
    add("--lr_scheduler_num_cycles", type=int, default=1)
    add("--no_metadata", **flag)
    add("--unet_lr", type=float, default=None)
    add("--text_encoder_lr", type=float, default=None, nargs="*")
    add("--network_weights", type=str, default=None)
    add("--network_module", type=str, default=None)
    add("--network_dim", type=int, default=None)
    add("--network_alpha", type=float, default=1)
    add("--network_dropout", type=float, default=None)
    add("--network_args", type=str, default=None, nargs="*")
    add("--network_train_unet_only", **flag)
    add("--network_train_text_encoder_only", **flag)
    add("--training_comment", type=str, default=None)
    return p


# ------------------------------------------------------------------------------------------- output
class Console:
    """kohya's logging: plain lines on stdout with --console_log_simple, else a rich-like stderr layout."""

    def __init__(self, simple: bool) -> None:
        self.simple = simple

    def log(self, message: str, level: str = "INFO") -> None:
        if self.simple:
            print(message, flush=True)
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"{stamp} {level:<8} {message}", file=sys.stderr, flush=True)


def traceback_exit(frames: list[tuple[str, int, str, str]], error: str) -> NoReturn:
    lines = ["Traceback (most recent call last):"]
    for file, line, func, code in frames:
        lines += [f'  File "{file}", line {line}, in {func}', f"    {code}"]
    print("\n".join([*lines, error]), file=sys.stderr, flush=True)
    sys.exit(1)


def script_frame(line: int, func: str, code: str) -> tuple[str, int, str, str]:
    return (os.path.abspath(__file__), line, func, code)


class StepBar:
    """tqdm(desc="steps", smoothing=0) as kohya draws it into a pipe: `\\r` redraws, width-10 bar."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0
        self.start = time.monotonic()
        self.postfix = ""
        self.draw()

    def draw(self) -> None:
        elapsed = time.monotonic() - self.start
        frac = self.n / self.total if self.total else 1.0
        eighths = int(frac * 10 * 8)
        bar = "█" * (eighths // 8) + (" ▏▎▍▌▋▊▉"[eighths % 8] if eighths < 80 else "")
        bar = bar.ljust(10)
        if self.n == 0 or elapsed <= 0:
            timing = "[00:00<?, ?it/s"
        else:
            rate = self.n / elapsed
            remaining = (self.total - self.n) / rate
            speed = f"{rate:5.2f}it/s" if rate >= 1 else f"{1 / rate:5.2f}s/it"
            timing = f"[{fmt_time(elapsed)}<{fmt_time(remaining)}, {speed}"
        postfix = f", {self.postfix}" if self.postfix else ""
        line = f"steps: {int(frac * 100):3d}%|{bar}| {self.n}/{self.total} {timing}{postfix}]"
        sys.stderr.write("\r" + line)
        sys.stderr.flush()
        self.last_draw = time.monotonic()

    def update(self) -> None:
        self.n += 1
        self.draw()

    def set_postfix(self, **values: float) -> None:
        self.postfix = ", ".join(f"{k}={v:.3g}" for k, v in values.items())
        self.draw()

    def unpause(self) -> None:
        # tqdm.unpause(): the time since the last redraw leaves the bar's elapsed time
        self.start += time.monotonic() - self.last_draw

    def close(self) -> None:
        self.draw()
        sys.stderr.write("\n")
        sys.stderr.flush()


def fmt_time(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


# ------------------------------------------------------------------------------------ dataset config
# kohya's ConfigSanitizer (library/config_util.py): voluptuous type checks are isinstance checks, so
# bool passes for int but int does NOT pass for float.
NUM = (float, int)
SUBSET_ASCENDABLE: dict[str, Any] = {
    "color_aug": bool,
    "face_crop_aug_range": "float_pair",
    "flip_aug": bool,
    "num_repeats": int,
    "random_crop": bool,
    "shuffle_caption": bool,
    "keep_tokens": int,
    "keep_tokens_separator": str,
    "secondary_separator": str,
    "caption_separator": str,
    "enable_wildcard": bool,
    "token_warmup_min": int,
    "token_warmup_step": NUM,
    "caption_prefix": str,
    "caption_suffix": str,
    "custom_attributes": dict,
    "resize_interpolation": str,
    "caption_dropout_every_n_epochs": int,
    "caption_dropout_rate": NUM,
    "caption_tag_dropout_rate": NUM,
    "caption_extension": str,
    "class_tokens": str,
    "cache_info": bool,
}
DATASET_ASCENDABLE: dict[str, Any] = {
    "batch_size": int,
    "bucket_no_upscale": bool,
    "bucket_reso_steps": int,
    "enable_bucket": bool,
    "max_bucket_reso": int,
    "min_bucket_reso": int,
    "validation_seed": int,
    "validation_split": float,
    "resolution": "int_or_int_pair",
    "network_multiplier": float,
    "resize_interpolation": str,
}
GENERAL_SCHEMA = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE}
SUBSET_SCHEMA = {**SUBSET_ASCENDABLE, "image_dir": str, "is_reg": bool, "alpha_mask": bool}
DATASET_SCHEMA = {**GENERAL_SCHEMA, "subsets": "subsets"}


class ConfigInvalid(Exception):
    pass


def _path(parts: list[str | int]) -> str:
    return "data" + "".join(f"[{p!r}]" for p in parts)


def _check_type(kind: Any, value: Any, where: list[str | int]) -> None:
    ok: bool
    label: str
    if kind == "float_pair":
        ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value)
        label = "float"
    elif kind == "int_or_int_pair":
        ok = isinstance(value, int) or (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)
        )
        label = "int"
    elif isinstance(kind, tuple):
        ok = isinstance(value, kind)
        label = kind[0].__name__
    else:
        ok = isinstance(value, kind)
        label = kind.__name__
    if not ok:
        raise ConfigInvalid(f"expected {label} for dictionary value @ {_path(where)}")


def _check_table(table: Any, schema: dict[str, Any], where: list[str | int]) -> None:
    if not isinstance(table, dict):
        raise ConfigInvalid(f"expected a dictionary for dictionary value @ {_path(where)}")
    for key, value in table.items():
        if key not in schema:
            raise ConfigInvalid(f"extra keys not allowed @ {_path([*where, key])}")
        kind = schema[key]
        if kind == "subsets":
            if not isinstance(value, list):
                raise ConfigInvalid(f"expected a list for dictionary value @ {_path([*where, key])}")
            for i, subset in enumerate(value):
                _check_table(subset, SUBSET_SCHEMA, [*where, key, i])
                if isinstance(subset, dict) and "image_dir" not in subset:
                    raise ConfigInvalid(f"required key not provided @ {_path([*where, key, i, 'image_dir'])}")
        else:
            _check_type(kind, value, [*where, key])


def validate_user_config(config: dict[str, Any]) -> None:
    for key in config:
        if key not in ("general", "datasets"):
            raise ConfigInvalid(f"extra keys not allowed @ {_path([key])}")
    if "general" in config:
        _check_table(config["general"], GENERAL_SCHEMA, ["general"])
    if "datasets" in config:
        if not isinstance(config["datasets"], list):
            raise ConfigInvalid("expected a list for dictionary value @ data['datasets']")
        for i, dataset in enumerate(config["datasets"]):
            _check_table(dataset, DATASET_SCHEMA, ["datasets", i])


# ------------------------------------------------------------------------------------------ dataset
class Subset:
    def __init__(self, image_dir: str, repeats: int, class_tokens: str | None, caption_ext: str,
                 captions: dict[str, Any] | None = None) -> None:
        self.image_dir = image_dir
        self.repeats = repeats
        self.class_tokens = class_tokens
        self.caption_ext = caption_ext
        # shuffle_caption, caption_dropout_rate, caption_tag_dropout_rate, token_warmup_step
        self.captions: dict[str, Any] = captions or {}
        self.images: list[Path] = []

    @property
    def text_encoder_output_cacheable(self) -> bool:
        """BaseDataset.is_text_encoder_output_cacheable: one encoding per caption must stay valid."""
        c = self.captions
        return not (c.get("caption_dropout_rate", 0) > 0 or c.get("shuffle_caption", False)
                    or c.get("token_warmup_step", 0) > 0 or c.get("caption_tag_dropout_rate", 0) > 0)


CAPTION_OPTIONS = ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate", "token_warmup_step")


class Buckets:
    """kohya's bucket settings for one dataset (BaseDataset: enable_bucket, min/max_bucket_reso, ...)."""

    def __init__(self, enable: bool, no_upscale: bool, min_reso: int, max_reso: int, steps: int) -> None:
        self.enable = enable
        self.no_upscale = no_upscale
        self.min_reso = min_reso
        self.max_reso = max_reso
        self.steps = steps


class Dataset:
    def __init__(self, resolution: tuple[int, int] | None, batch_size: int, subsets: list[Subset],
                 buckets: Buckets | None = None) -> None:
        self.resolution = resolution
        self.batch_size = batch_size
        self.subsets = subsets
        self.buckets = buckets or Buckets(False, False, 256, 1024, 64)
        # (width, height) -> images including repeats, filled by make_buckets
        self.bucket_counts: dict[tuple[int, int], int] = {}

    @property
    def images_with_repeats(self) -> int:
        return sum(len(s.images) * s.repeats for s in self.subsets)

    @property
    def batches_per_epoch(self) -> int:
        # kohya never mixes buckets in a batch (BaseDataset.make_buckets: buckets_indices per bucket)
        return sum(math.ceil(n / self.batch_size) for n in self.bucket_counts.values())


def parse_resolution(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, list):
        return (int(value[0]), int(value[1]))
    parts = [int(v) for v in str(value).split(",")]
    return (parts[0], parts[-1])


def datasets_from_config(args: argparse.Namespace, console: Console) -> list[Dataset]:
    path = Path(args.dataset_config)
    console.log(f"Loading dataset config from {path}")
    if not path.is_file():
        traceback_exit(
            [script_frame(1913, "<module>", "trainer.train(args)")],
            f"ValueError: file not found / ファイルが見つかりません: {path}",
        )
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        console.log(
            "Error on parsing TOML config file. Please check the format. / "
            f"TOML 形式の設定ファイルの読み込みに失敗しました。文法が正しいか確認してください。: {path}",
            "ERROR",
        )
        traceback_exit([script_frame(1913, "<module>", "trainer.train(args)")], f"toml.decoder.TomlDecodeError: {e}")
    try:
        validate_user_config(config)
    except ConfigInvalid as e:
        console.log("Invalid user config / ユーザ設定の形式が正しくないようです", "ERROR")
        traceback_exit(
            [script_frame(1913, "<module>", "trainer.train(args)")], f"voluptuous.error.MultipleInvalid: {e}"
        )
    general = config.get("general", {})
    datasets = []
    for ds in config.get("datasets", []):
        # Precedence: subset > dataset > general > command line (kohya's BlueprintGenerator).
        def pick(key: str, cli: Any, *tables: dict[str, Any]) -> Any:
            for table in tables:
                if key in table:
                    return table[key]
            return cli

        subsets = [
            Subset(
                image_dir=sub["image_dir"],
                repeats=pick("num_repeats", 1, sub, ds, general),
                class_tokens=pick("class_tokens", None, sub, ds, general),
                caption_ext=pick("caption_extension", args.caption_extension, sub, ds, general),
                captions={key: pick(key, getattr(args, key), sub, ds, general) for key in CAPTION_OPTIONS},
            )
            for sub in ds.get("subsets", [])
        ]
        resolution = parse_resolution(pick("resolution", args.resolution, ds, general))
        buckets = Buckets(
            pick("enable_bucket", args.enable_bucket, ds, general),
            pick("bucket_no_upscale", args.bucket_no_upscale, ds, general),
            pick("min_bucket_reso", args.min_bucket_reso, ds, general),
            pick("max_bucket_reso", args.max_bucket_reso, ds, general),
            pick("bucket_reso_steps", args.bucket_reso_steps, ds, general),
        )
        datasets.append(Dataset(resolution, pick("batch_size", args.train_batch_size, ds, general), subsets, buckets))
    return datasets


def datasets_from_folders(args: argparse.Namespace, console: Console) -> list[Dataset]:
    console.log("Using DreamBooth method.")
    subsets = []
    root = Path(args.train_data_dir or "")
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if not child.is_dir():
            continue
        head, _, concept = child.name.partition("_")
        if not head.isdigit() or int(head) < 1:
            console.log(
                f"ignore directory without repeats / 繰り返し回数のないディレクトリを無視します: {child.name}",
                "WARNING",
            )
            continue
        subsets.append(Subset(str(child), int(head), concept or None, args.caption_extension,
                              {key: getattr(args, key) for key in CAPTION_OPTIONS}))
    buckets = Buckets(args.enable_bucket, args.bucket_no_upscale, args.min_bucket_reso, args.max_bucket_reso,
                      args.bucket_reso_steps)
    return [Dataset(parse_resolution(args.resolution), args.train_batch_size, subsets, buckets)]


def scan_images(datasets: list[Dataset], console: Console) -> None:
    console.log("prepare images.")
    for ds in datasets:
        for subset in ds.subsets:
            folder = Path(subset.image_dir)
            if not folder.is_dir():
                console.log(f"not directory: {subset.image_dir}", "WARNING")
                continue
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not images:
                console.log(
                    f"ignore subset with image_dir='{subset.image_dir}': no images found / "
                    "画像が見つからないためサブセットを無視します",
                    "WARNING",
                )
                continue
            console.log(f"found directory {subset.image_dir} contains {len(images)} image files")
            missing = 0
            for image in images:
                caption = image.with_suffix(subset.caption_ext)
                if not caption.is_file():
                    missing += 1
                    continue
                if not caption.read_text(encoding="utf-8").splitlines():
                    traceback_exit(
                        [script_frame(1913, "<module>", "trainer.train(args)")],
                        f"AssertionError: caption file is empty / キャプションファイルが空です: {caption}",
                    )
            if missing:
                console.log(
                    f"No caption file found for {missing} images. Training will continue without captions for "
                    "these images. If class token exists, it will be used. / "
                    f"{missing}枚の画像にキャプションファイルが見つかりませんでした。",
                    "WARNING",
                )
            subset.images = images
    for ds in datasets:
        console.log(f"{ds.images_with_repeats} train images with repeats.")
    console.log("0 reg images with repeats.")
    console.log("no regularization images / 正則化画像が見つかりませんでした", "WARNING")


# ----------------------------------------------------------------------------------------- buckets
# Written from sd-scripts 48d368fa library/train_util.py (BucketManager, BaseDataset.make_buckets,
# adjust_min_max_bucket_reso_by_steps) and library/model_util.py (make_bucket_resolutions); no daemon code.
MIN_BUCKET_ASSERT = (
    "AssertionError: min_bucket_reso must be equal or less than resolution / min_bucket_resoは最小解像度より大きく"
    "できません。解像度を大きくするかmin_bucket_resoを小さくしてください"
)
MAX_BUCKET_ASSERT = (
    "AssertionError: max_bucket_reso must be equal or greater than resolution / max_bucket_resoは最大解像度より小さく"
    "できません。解像度を小さくするかmin_bucket_resoを大きくしてください"
)
NO_UPSCALE_WARNING = (
    "min_bucket_reso and max_bucket_reso are ignored if bucket_no_upscale is set, because bucket reso is defined "
    "by image size automatically / bucket_no_upscaleが指定された場合は、bucketの解像度は画像サイズから自動計算"
    "されるため、min_bucket_resoとmax_bucket_resoは無視されます"
)


def check_bucket_range(ds: Dataset, console: Console) -> None:
    b = ds.buckets
    if not b.enable or ds.resolution is None:
        return
    if b.min_reso % b.steps:
        adjusted = b.min_reso - b.min_reso % b.steps
        console.log(f"min_bucket_reso is adjusted to be multiple of bucket_reso_steps / min_bucket_resoが"
                    f"bucket_reso_stepsの倍数になるように調整されました: {b.min_reso} -> {adjusted}", "WARNING")
        b.min_reso = adjusted
    if b.max_reso % b.steps:
        adjusted = b.max_reso + b.steps - b.max_reso % b.steps
        console.log(f"max_bucket_reso is adjusted to be multiple of bucket_reso_steps / max_bucket_resoが"
                    f"bucket_reso_stepsの倍数になるように調整されました: {b.max_reso} -> {adjusted}", "WARNING")
        b.max_reso = adjusted
    frames = [script_frame(1913, "<module>", "trainer.train(args)")]
    if min(ds.resolution) < b.min_reso:
        traceback_exit(frames, MIN_BUCKET_ASSERT)
    if max(ds.resolution) > b.max_reso:
        traceback_exit(frames, MAX_BUCKET_ASSERT)


def predefined_resos(max_reso: tuple[int, int], min_size: int, max_size: int, divisible: int) -> list[tuple[int, int]]:
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def select_bucket(ds: Dataset, size: tuple[int, int], predefined: list[tuple[int, int]]) -> tuple[int, int]:
    """BucketManager.select_bucket: the bucket resolution for one picture."""
    assert ds.resolution is not None
    width, height = size
    aspect = width / height
    if not ds.buckets.enable:
        return ds.resolution
    if not ds.buckets.no_upscale:
        if size in predefined:
            return size
        return min(predefined, key=lambda r: abs(r[0] / r[1] - aspect))
    steps = ds.buckets.steps
    max_area = ds.resolution[0] * ds.resolution[1]
    if width * height > max_area:
        resized_width = math.sqrt(max_area * aspect)
        resized_height = max_area / resized_width
        b_width = round_to_steps(resized_width, steps)
        b_height_in_w = round_to_steps(b_width / aspect, steps)
        b_height = round_to_steps(resized_height, steps)
        b_width_in_h = round_to_steps(b_height * aspect, steps)
        if abs(b_width / b_height_in_w - aspect) < abs(b_width_in_h / b_height - aspect):
            width, height = b_width, int(b_width / aspect + 0.5)
        else:
            width, height = int(b_height * aspect + 0.5), b_height
    return width - width % steps, height - height % steps


def image_size(path: Path, fallback: tuple[int, int]) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return fallback  # real kohya fails on such a file later, while caching latents (decode_images)


def make_buckets(ds: Dataset, console: Console) -> None:
    """BaseDataset.make_buckets: one bucket per resolution, each picture counted num_repeats times."""
    assert ds.resolution is not None
    console.log("loading image sizes.")
    b = ds.buckets
    predefined: list[tuple[int, int]] = []
    if b.enable:
        console.log("make buckets")
        if b.no_upscale:
            console.log(NO_UPSCALE_WARNING, "WARNING")
        else:
            predefined = predefined_resos(ds.resolution, b.min_reso, b.max_reso, b.steps)
    else:
        console.log("prepare dataset")
    errors = []
    counts: dict[tuple[int, int], int] = {}
    for subset in ds.subsets:
        for image in subset.images:
            size = image_size(image, ds.resolution)
            reso = select_bucket(ds, size, predefined)
            errors.append(abs(reso[0] / reso[1] - size[0] / size[1]))
            counts[reso] = counts.get(reso, 0) + subset.repeats
    ds.bucket_counts = dict(sorted(counts.items()))
    if b.enable:
        console.log("number of images (including repeats) / 各bucketの画像枚数（繰り返し回数を含む）")
        for i, (reso, count) in enumerate(ds.bucket_counts.items()):
            console.log(f"bucket {i}: resolution {reso}, count: {count}")
        console.log(f"mean ar error (without repeats): {sum(errors) / len(errors) if errors else 0}")


# ------------------------------------------------------------------------------------------- model
def checkpoint_keys(path: str) -> list[str] | None:
    """The tensor names in a .safetensors header (8-byte little-endian length, then JSON); None when unreadable."""
    if not path.lower().endswith(".safetensors") or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        return None
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else None


def is_sdxl(keys: list[str]) -> bool:
    return any(k.startswith("conditioner.embedders.") for k in keys)


def state_dict_error(model_class: str, detail_lines: list[str], frames: list[tuple[str, int, str, str]]) -> NoReturn:
    """torch's load_state_dict failure: one RuntimeError line, then a tab-indented line per kind of mismatch."""
    traceback_exit(frames, "\n".join([f"RuntimeError: Error(s) in loading state_dict for {model_class}:",
                                       *(f"\t{line}" for line in detail_lines)]))


LOAD_FRAMES = [
    script_frame(1913, "<module>", "trainer.train(args)"),
    script_frame(602, "train", "model_version, text_encoder, vae, unet = self.load_target_model(args, weight_dtype, "
                                "accelerator)"),
]


class Sd1Model:
    """What train_network.py does for SD 1.x; SdxlModel (sdxl_train_network.py) overrides the differences."""

    tokenizer_ids: tuple[str, ...] = (CLIP_L,)
    te_modules_created = 72
    unet_modules_created = 192
    base_model_version = "sd_v1"
    architecture = "stable-diffusion-v1/lora"
    implementation = "diffusers"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """train_network.py's parser is build_parser()."""

    def assert_extra_args(self, args: argparse.Namespace, datasets: list[Dataset]) -> None:
        """NetworkTrainer.assert_extra_args: nothing for SD 1.x."""

    def tokenizer_preamble(self, console: Console) -> None:
        console.log("Using v1 tokenizer")

    def check_tokenizer(self, args: argparse.Namespace, console: Console) -> None:
        """strategy_base._load_tokenizer for each id: the cache dir's folder, else a download (offline: fails)."""
        self.tokenizer_preamble(console)
        for tokenizer_id in self.tokenizer_ids:
            local = Path(args.tokenizer_cache_dir or "") / tokenizer_id.replace("/", "_")
            if args.tokenizer_cache_dir and local.is_dir():
                console.log(f"load tokenizer from cache: {local}")
                continue
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                traceback_exit(
                    [script_frame(507, "train", "tokenize_strategy = self.get_tokenize_strategy(args)")],
                    "TypeError: expected str, bytes or os.PathLike object, not NoneType",
                )
            # Online: the real script downloads the tokenizer and, with a cache dir, saves it there.
            if args.tokenizer_cache_dir:
                local.mkdir(parents=True, exist_ok=True)
                console.log(f"save Tokenizer to cache: {local}")

    def load_model(self, args: argparse.Namespace, console: Console) -> None:
        console.log("preparing accelerator")
        device = "cpu" if os.environ.get("ACCELERATE_USE_CPU") else "cuda"
        print(f"accelerator device: {device}", flush=True)
        console.log("loading model for process 0/1")
        path = args.pretrained_model_name_or_path or ""
        if os.path.isfile(path):
            console.log(f"load StableDiffusion checkpoint: {path}")
        else:
            console.log(f"load Diffusers pretrained models: {path}")
            if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))):
                traceback_exit(
                    LOAD_FRAMES,
                    f'ValueError: The provided pretrained_model_name_or_path "{path}" is neither a valid local path '
                    "nor a valid repo id. Please check the parameter.",
                )
        self.load_parts(path, console)
        if args.sdpa:
            console.log("Enable SDPA for U-Net")

    def load_parts(self, path: str, console: Console) -> None:
        keys = checkpoint_keys(path)
        if keys is not None and is_sdxl(keys):
            # Run 11: SD1's hard-wired U-Net config meets SDXL's 2048-wide cross-attention.
            print("UNet2DConditionModel: 64, 8, 768, False, False", flush=True)
            state_dict_error("UNet2DConditionModel", [
                'Missing key(s) in state_dict: "down_blocks.0.attentions.0.norm.weight", '
                '"down_blocks.0.attentions.0.proj_in.weight". ',
                'Unexpected key(s) in state_dict: '
                '"down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k.weight". ',
                "size mismatch for mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight: copying a param "
                "with shape torch.Size([1280, 2048]) from checkpoint, the shape in current model is "
                "torch.Size([1280, 768]).",
            ], LOAD_FRAMES)
        for part in ("u-net", "vae", "text encoder"):
            console.log(f"loading {part}: <All keys matched successfully>")

    def cache_text_encoder_outputs(self, args: argparse.Namespace, datasets: list[Dataset], console: Console) -> None:
        """Only SDXL caches them."""

    def dtype_lines(self, args: argparse.Namespace, dtype: str, device: str) -> list[str]:
        return [f"unet dtype: {dtype}, device: {device}"]

    def network_lines(self, args: argparse.Namespace, console: Console, dim: int) -> None:
        console.log(f"create LoRA network. base dim (rank): {dim}, alpha: {float(args.network_alpha)}")
        # Real kohya creates the text-encoder modules even with --network_train_unet_only, then skips them.
        console.log(f"create LoRA for Text Encoder: {self.te_modules_created} modules.")
        console.log(f"create LoRA for U-Net: {self.unet_modules_created} modules.")
        if not args.network_train_unet_only:
            console.log(f"enable LoRA for text encoder: {self.te_modules_created} modules")
        console.log(f"enable LoRA for U-Net: {self.unet_modules_created} modules")

    def lora_modules(self) -> tuple[dict[str, list[tuple[str, int, int]]], list[tuple[str, int, int, bool]]]:
        """({key prefix: text-encoder modules}, U-Net modules)."""
        return {"lora_te": TE_MODULES}, UNET_MODULES

    def modelspec_resolution(self, args: argparse.Namespace) -> str:
        return "512x512"


def decode_images(datasets: list[Dataset]) -> None:
    """Real kohya first opens the images when caching latents (or at the first batch without caching)."""
    from PIL import Image, UnidentifiedImageError

    for ds in datasets:
        for subset in ds.subsets:
            for image in subset.images:
                try:
                    with Image.open(image) as im:
                        im.convert("RGB").load()
                except (UnidentifiedImageError, OSError):
                    traceback_exit(
                        [script_frame(1913, "<module>", "trainer.train(args)")],
                        f"PIL.UnidentifiedImageError: cannot identify image file '{image}'",
                    )


# -------------------------------------------------------------------------------------------- LoRA
# (module name, in features, out features, 1x1 conv?) -- real SD1.5 names as kohya's networks.lora writes
# them; the real file has 192 U-Net and 72 text-encoder modules, a handful is enough for a double.
UNET_MODULES = [
    ("down_blocks_0_attentions_0_proj_in", 320, 320, True),
    ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320, False),
    ("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320, False),
    ("mid_block_attentions_0_transformer_blocks_0_attn1_to_v", 1280, 1280, False),
    ("up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2", 1280, 320, False),
    ("up_blocks_3_attentions_2_proj_out", 320, 320, True),
]
TE_MODULES = [
    ("text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
    ("text_model_encoder_layers_0_self_attn_v_proj", 768, 768),
    ("text_model_encoder_layers_11_mlp_fc1", 768, 3072),
]


def lora_tensors(args: argparse.Namespace, rng: random.Random, model: Sd1Model | None = None) -> dict[str, Any]:
    import numpy as np

    dtype = np.float16 if args.save_precision == "fp16" else np.float32
    dim = args.network_dim or 4
    gen = np.random.default_rng(rng.randrange(2**32))

    def module(prefix: str, name: str, n_in: int, n_out: int, conv: bool) -> dict[str, Any]:
        down = gen.normal(0, 0.02, (dim, n_in)).astype(dtype)
        up = gen.normal(0, 0.002, (n_out, dim)).astype(dtype)
        if conv:
            down, up = down.reshape(dim, n_in, 1, 1), up.reshape(n_out, dim, 1, 1)
        key = f"{prefix}_{name}"
        return {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": np.array(args.network_alpha, dtype=dtype),
        }

    tensors: dict[str, Any] = {}
    te_modules, unet_modules = (model or Sd1Model()).lora_modules()
    if not args.network_train_unet_only:
        for prefix, modules in te_modules.items():
            for name, n_in, n_out in modules:
                tensors.update(module(prefix, name, n_in, n_out, False))
    for name, n_in, n_out, conv in unet_modules:
        tensors.update(module("lora_unet", name, n_in, n_out, conv))
    pad_bytes = float(os.environ.get("KOHYA_DOUBLE_LORA_MB", "0")) * 2**20
    while sum(t.nbytes for t in tensors.values()) < pad_bytes:
        key = f"lora_unet_double_padding_{len(tensors)}"
        tensors[f"{key}.lora_down.weight"] = np.zeros((dim, 2**18), dtype=dtype)
        tensors[f"{key}.lora_up.weight"] = np.zeros((2**18, dim), dtype=dtype)
        tensors[f"{key}.alpha"] = np.array(args.network_alpha, dtype=dtype)
    return tensors


def lora_metadata(args: argparse.Namespace, run: Run, epoch: int, step: int) -> dict[str, str]:
    te_lr = None if args.network_train_unet_only else (args.text_encoder_lr or [args.learning_rate])[0]
    meta = {
        "ss_session_id": str(run.session_id),
        "ss_training_started_at": str(run.started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": str(args.output_name),
        "ss_learning_rate": str(args.learning_rate),
        "ss_unet_lr": str(args.unet_lr),
        "ss_text_encoder_lr": str(te_lr),
        "ss_num_train_images": str(run.images),
        "ss_num_batches_per_epoch": str(run.batches_per_epoch),
        "ss_num_epochs": str(run.epochs),
        "ss_max_train_steps": str(run.total_steps),
        "ss_lr_warmup_steps": str(args.lr_warmup_steps),
        "ss_lr_scheduler": str(args.lr_scheduler),
        "ss_network_module": str(args.network_module),
        "ss_network_dim": str(args.network_dim),
        "ss_network_alpha": str(args.network_alpha),
        "ss_mixed_precision": str(args.mixed_precision),
        "ss_gradient_checkpointing": str(args.gradient_checkpointing),
        "ss_fp8_base": str(args.fp8_base),
        "ss_cache_latents": str(args.cache_latents),
        "ss_seed": str(args.seed),
        "ss_v2": str(args.v2),
        "ss_base_model_version": run.model.base_model_version,
        "ss_optimizer": optimizer_label(run),
        "ss_training_comment": str(args.training_comment),
        "ss_sd_model_name": os.path.basename(args.pretrained_model_name_or_path or ""),
        "ss_sd_scripts_commit_hash": "(kohya double)",
        "ss_epoch": str(epoch),
        "ss_steps": str(step),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": run.model.architecture,
        "modelspec.implementation": run.model.implementation,
        "modelspec.title": args.metadata_title or str(args.output_name),
        "modelspec.resolution": run.model.modelspec_resolution(args),
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if args.metadata_trigger_phrase:
        meta["modelspec.trigger_phrase"] = args.metadata_trigger_phrase
    return meta


def save_lora(args: argparse.Namespace, run: Run, path: Path, epoch: int, step: int) -> None:
    from safetensors.numpy import save_file

    print(f"\nsaving checkpoint: {path}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors(args, run.rng, run.model), str(path), metadata=lora_metadata(args, run, epoch, step))


# -------------------------------------------------------------------------------------------- train
class Run:
    def __init__(self, args: argparse.Namespace, datasets: list[Dataset], model: Sd1Model | None = None) -> None:
        self.model = model or Sd1Model()
        self.images = sum(ds.images_with_repeats for ds in datasets)
        self.batch_size = datasets[0].batch_size
        self.batches_per_epoch = sum(ds.batches_per_epoch for ds in datasets)
        if args.max_train_epochs:
            self.epochs = args.max_train_epochs
            self.total_steps = self.batches_per_epoch * self.epochs
        else:
            self.total_steps = args.max_train_steps
            self.epochs = math.ceil(self.total_steps / self.batches_per_epoch)
        self.optimizer = (args.optimizer_type or "AdamW").lower()
        self.optimizer_kwargs = parse_optimizer_args(args.optimizer_args or [])
        self.session_id = random.randint(0, 2**32)
        self.started_at = time.time()
        self.rng = random.Random(args.seed)


def parse_optimizer_args(items: list[str]) -> dict[str, Any]:
    # kohya reads `key=value` pairs and evaluates each value as a Python literal when it can.
    kwargs: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return kwargs


def optimizer_label(run: Run) -> str:
    name = OPTIMIZER_LABELS[run.optimizer][1]
    if not run.optimizer_kwargs:
        return name
    return name + "(" + ",".join(f"{k}={v}" for k, v in run.optimizer_kwargs.items()) + ")"


def train(args: argparse.Namespace, datasets: list[Dataset], console: Console, model: Sd1Model | None = None) -> None:
    run = Run(args, datasets, model)
    fail = os.environ.get("KOHYA_DOUBLE_FAIL", "")
    if fail not in ("", "oom", "crash", "no_output"):
        print(f"kohya double: unknown KOHYA_DOUBLE_FAIL={fail!r}", file=sys.stderr)
        sys.exit(1)
    step_seconds = float(os.environ.get("KOHYA_DOUBLE_STEP_SECONDS", "0.01"))
    if run.optimizer not in OPTIMIZER_LABELS:
        traceback_exit(
            [script_frame(1913, "<module>", "trainer.train(args)")],
            f"ModuleNotFoundError: No module named '{args.optimizer_type.rsplit('.', 1)[0]}'",
        )

    print(f"import network module: {args.network_module}", flush=True)
    if args.network_module != "networks.lora":
        traceback_exit(
            [script_frame(1913, "<module>", "trainer.train(args)")],
            f"ModuleNotFoundError: No module named '{args.network_module}'",
        )
    run.model.network_lines(args, console, args.network_dim or 4)
    console.log("prepare optimizer, data loader etc.")
    console.log(f"use {OPTIMIZER_LABELS[run.optimizer][0]} optimizer | {run.optimizer_kwargs}")
    if (args.fp8_base or args.fp8_base_unet) and args.mixed_precision == "no":
        # train_network.py L829-833: asserted only now, after the whole start-up (run 14)
        traceback_exit(
            [script_frame(1913, "<module>", "trainer.train(args)"),
             script_frame(832, "train", 'args.mixed_precision != "no"')],
            "AssertionError: fp8_base requires mixed precision='fp16' or 'bf16' / fp8を使う場合はmixed_precision="
            "'fp16'または'bf16'が必要です。",
        )
    if args.max_train_epochs:
        console.log(
            f"override steps. steps for {run.epochs} epochs is / 指定エポックまでのステップ数: {run.total_steps}"
        )
    first_epoch = resume_start(args, run, console) if args.resume else 1
    print(
        "running training / 学習開始\n"
        f"  num train images * repeats / 学習画像の数×繰り返し回数: {run.images}\n"
        "  num validation images * repeats / 学習画像の数×繰り返し回数: 0\n"
        "  num reg images / 正則化画像の数: 0\n"
        f"  num batches per epoch / 1epochのバッチ数: {run.batches_per_epoch}\n"
        f"  num epochs / epoch数: {run.epochs}\n"
        f"  batch size per device / バッチサイズ: {run.batch_size}\n"
        "  gradient accumulation steps / 勾配を合計するステップ数 = 1\n"
        f"  total optimization steps / 学習ステップ数: {run.total_steps}",
        flush=True,
    )
    dtype = {"no": "torch.float32", "fp16": "torch.float16", "bf16": "torch.bfloat16"}[args.mixed_precision]
    device = "cpu" if os.environ.get("ACCELERATE_USE_CPU") else "cuda:0"
    print("\n".join(run.model.dtype_lines(args, dtype, device)), flush=True)
    flood(console, float(os.environ.get("KOHYA_DOUBLE_FLOOD_MB", "0")))

    bar = StepBar(run.total_steps)
    fail_at = max(1, run.total_steps // 2)
    step, loss_sum = 0, 0.0
    output_dir = Path(args.output_dir or ".")
    name = args.output_name or "last"
    for epoch in range(first_epoch, run.epochs + 1):
        print(f"\nepoch {epoch}/{run.epochs}\n", flush=True)
        console.log(f"epoch is incremented. current_epoch: {epoch - 1}, epoch: {epoch}")
        for _ in range(run.batches_per_epoch):
            if step >= run.total_steps:
                break
            time.sleep(step_seconds)
            step += 1
            out_of_memory_knobs(args, run, step)
            if fail and fail != "no_output" and step >= fail_at:
                fail_now(fail)
            loss_sum += 0.12 + 0.05 * run.rng.random()
            bar.update()
            bar.set_postfix(avr_loss=loss_sum / step)
        every = args.save_every_n_epochs
        if every and epoch % every == 0 and epoch < run.epochs and fail != "no_output":
            save_lora(args, run, output_dir / f"{name}-{epoch:06d}.safetensors", epoch, step)
            if args.save_state:
                console.log("")  # kohya logs an empty line first (train_util.py L5941), ending the bar's line
                console.log(f"saving state at epoch {epoch}")
                save_state(args, console, output_dir / f"{name}-{epoch:06d}-state", epoch, step)
                keep = args.save_last_n_epochs_state or args.save_last_n_epochs
                old = epoch - every * keep if keep else 0
                if old > 0 and (output_dir / f"{name}-{old:06d}-state").is_dir():
                    console.log(f"removing old state: {output_dir / f'{name}-{old:06d}-state'}")
                    shutil.rmtree(output_dir / f"{name}-{old:06d}-state")
        if args.sample_every_n_epochs and epoch % args.sample_every_n_epochs == 0:
            sample_images(args, console, output_dir, name, epoch, step)
            bar.unpause()
    bar.close()
    if fail == "no_output":
        return
    if args.save_state or args.save_state_on_train_end:
        console.log("")  # train_util.py L5989, as above
        console.log("saving last state.")
        save_state(args, console, output_dir / f"{name}-state", run.epochs, step)
    save_lora(args, run, output_dir / f"{name}.safetensors", run.epochs, step)
    console.log("model saved.")


# ------------------------------------------------------------------------------------- saved state
STATE_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def save_state(args: argparse.Namespace, console: Console, folder: Path, epoch: int, step: int) -> None:
    """accelerator.save_state as kohya calls it: its train_state.json hook first, random states last."""
    folder.mkdir(parents=True, exist_ok=True)
    console.log(f"Saving current state to {folder}")
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": epoch, "current_step": step}),
                                             encoding="utf-8")
    size = 4096 * (args.network_dim or 4)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    (folder / "optimizer.bin").write_bytes(b"\0" * 2 * size)  # Adam's two moments: twice the network
    (folder / "scheduler.bin").write_bytes(b"\0" * 1465)
    time.sleep(float(os.environ.get("KOHYA_DOUBLE_STATE_SECONDS", "0")))
    (folder / "random_states_0.pkl").write_bytes(b"\0" * 14497)


def resume_start(args: argparse.Namespace, run: Run, console: Console) -> int:
    """train_network.py L968-1273 with --resume: load the state, then the epoch to start from (1-based)."""
    folder = Path(args.resume)
    console.log(f"resume training from local state: {folder}")
    frames = [script_frame(1913, "<module>", "trainer.train(args)"),
              script_frame(975, "train", "train_util.resume_from_local_or_hf_if_specified(accelerator, args)")]
    if not folder.is_dir():
        traceback_exit(frames, f"ValueError: Tried to find {folder} but folder does not exist")
    console.log(f"Loading states from {folder}")
    recorded = {"current_step": 0}
    if (folder / "train_state.json").is_file():  # kohya's load hook reads it only when it is there
        recorded = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
        console.log(f"load train state from {folder / 'train_state.json'}: {recorded}")
    for file, what in zip(STATE_FILES[:3], ("model weights", "optimizer states", "scheduler states"), strict=True):
        if not (folder / file).is_file():
            traceback_exit(frames, f"FileNotFoundError: [Errno 2] No such file or directory: '{folder / file}'")
        console.log(f"All {what} loaded successfully")
    if not (folder / STATE_FILES[3]).is_file():
        console.log("Could not load random states")
    initial_step = int(recorded["current_step"])
    if args.initial_step is not None or args.initial_epoch is not None:
        console.log("steps from the state is ignored because initial_step is specified / "
                    "initial_stepが指定されているため、stateからのステップ数は無視されます", "WARNING")
        initial_step = (args.initial_step if args.initial_step is not None
                        else (args.initial_epoch - 1) * run.batches_per_epoch)
    if run.total_steps <= initial_step:
        traceback_exit(
            [script_frame(1913, "<module>", "trainer.train(args)"),
             script_frame(1254, "train", "args.max_train_steps > initial_step")],
            "AssertionError: max_train_steps should be greater than initial step / "
            f"max_train_stepsは初期ステップより大きい必要があります: {run.total_steps} vs {initial_step}",
        )
    return initial_step // run.batches_per_epoch + 1


def flood(console: Console, megabytes: float) -> None:
    """Log lines as kohya prints them (plain with --console_log_simple, else Rich-shaped on stderr), in big writes."""
    target = int(megabytes * 1024 * 1024)
    stream = sys.stdout if console.simple else sys.stderr
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    written, n = 0, 0
    while written < target:
        block = []
        for _ in range(500):
            message = f"caching latents: bucket {n % 64} image {n} of the flood, size (512, 512) -> (64, 64)"
            rich = f"{stamp} INFO     {message:<80} train_util.py:{1000 + n % 900}"
            block.append(message if console.simple else rich)
            n += 1
        text = "\n".join(block) + "\n"
        stream.write(text)
        written += len(text.encode("utf-8"))
    stream.flush()


def sample_images(args: argparse.Namespace, console: Console, output_dir: Path, name: str, epoch: int,
                  step: int) -> None:
    """Like kohya's sample_images_common: one PNG per prompt line into <output_dir>/sample/."""
    console.log(f"generating sample images at step / サンプル画像生成 ステップ: {step}")
    if not args.sample_prompts or not Path(args.sample_prompts).is_file():
        console.log(f"No prompt file / プロンプトファイルがありません: {args.sample_prompts}", "ERROR")
        return
    from PIL import Image

    lines = [ln.strip() for ln in Path(args.sample_prompts).read_text(encoding="utf-8").splitlines()]
    sample_dir = output_dir / "sample"
    sample_dir.mkdir(parents=True, exist_ok=True)
    for index, line in enumerate(ln for ln in lines if ln and not ln.startswith("#")):
        prompt, _, options = line.partition(" --")
        opts = dict(o.split(" ", 1) for o in options.split(" --") if " " in o)
        width, height = int(opts.get("w", 512)), int(opts.get("h", 512))
        seed = opts.get("d")
        console.log(f"prompt: {prompt}")
        console.log(f"height: {height}")
        console.log(f"width: {width}")
        sampler_bar(float(os.environ.get("KOHYA_DOUBLE_SAMPLE_SECONDS", "0")))
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
        suffix = "" if seed is None else f"_{seed}"
        picture = Image.new("RGB", (width, height), ((epoch * 40) % 256, 90, 160))
        picture.save(sample_dir / f"{name}_e{epoch:06d}_{index:02d}_{stamp}{suffix}.png")


def sampler_bar(seconds: float, steps: int = 4) -> None:
    """The diffusers inference bar under the steps bar: no desc, each redraw ends with a cursor-up."""
    start = time.monotonic()
    for n in range(steps + 1):
        if n:
            time.sleep(seconds / steps)
        elapsed = time.monotonic() - start
        done = "█" * (10 * n // steps)
        timing = "[00:00<?, ?it/s]" if n == 0 else f"[{fmt_time(elapsed)}<00:00, {n / max(elapsed, 1e-3):5.2f}it/s]"
        sys.stderr.write(f"\r{100 * n // steps:3d}%|{done.ljust(10)}| {n}/{steps} {timing}\x1b[A")
        sys.stderr.flush()


def fail_now(kind: str) -> NoReturn:
    sys.stderr.write("\n")
    frames = [
        script_frame(1913, "<module>", "trainer.train(args)"),
        script_frame(1475, "train", "accelerator.backward(loss)"),
    ]
    if kind == "oom":
        traceback_exit(
            frames,
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity "
            "of 7.79 GiB of which 11.56 MiB is free. Including non-PyTorch memory, this process has 7.76 GiB "
            "memory in use. Of the allocated memory 7.41 GiB is allocated by PyTorch, and 150.12 MiB is reserved "
            "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
            "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        )
    traceback_exit(frames, "RuntimeError: kohya double: simulated trainer crash")


def out_of_memory_knobs(args: argparse.Namespace, run: Run, step: int) -> None:
    """KOHYA_DOUBLE_OOM_*: die like torch does when these settings need more memory than the card has."""
    if step != int(os.environ.get("KOHYA_DOUBLE_OOM_AT_STEP", "1")):
        return
    above = os.environ.get("KOHYA_DOUBLE_OOM_ABOVE_BATCH")
    too_big = above is not None and run.batch_size > int(above)
    checkpointing_needed = os.environ.get("KOHYA_DOUBLE_OOM_WITHOUT_CHECKPOINTING") == "1"
    no_checkpointing = checkpointing_needed and not args.gradient_checkpointing
    if not (too_big or no_checkpointing):
        return
    sys.stderr.write("\n")
    frames = [
        script_frame(1913, "<module>", "trainer.train(args)"),
        script_frame(1475, "train", "accelerator.backward(loss)"),
    ]
    if os.environ.get("ACCELERATE_USE_CPU"):
        # torch's CPU allocator (RAM), as a CPU run dies when the machine has too little
        traceback_exit(frames, "RuntimeError: [enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: not "
                               f"enough memory: you tried to allocate {run.batch_size * 536870912} bytes.")
    # the activations of one more picture do not fit: what a batch too big for the card asks for
    traceback_exit(
        frames,
        f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {run.batch_size * 160:.2f} MiB. GPU 0 has a "
        "total capacity of 23.99 GiB of which 17.56 MiB is free. Including non-PyTorch memory, this process has "
        "23.94 GiB memory in use. Of the allocated memory 23.10 GiB is allocated by PyTorch, and 421.12 MiB is "
        "reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
        "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
    )


# --------------------------------------------------------------------------------------------- main
def record_invocation() -> None:
    target = os.environ.get("KOHYA_DOUBLE_RECORD")
    if target:
        # A plain JSON list of the arguments after the script path, so tests can argv.index("--flag").
        Path(target).write_text(json.dumps(sys.argv[1:]), encoding="utf-8")


def spawn_grandchild() -> None:
    mode = os.environ.get("KOHYA_DOUBLE_SPAWN_CHILD")
    if mode not in ("1", "own_session"):
        return
    # Same process group and session as us: only a group kill reaches it, like kohya's dataloader workers.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], stdin=subprocess.DEVNULL, close_fds=True,
        start_new_session=mode == "own_session",
    )
    print(f"double child pid: {child.pid}", flush=True)


def main(model: Sd1Model | None = None) -> None:
    model = model or Sd1Model()
    record_invocation()
    parser = build_parser()
    model.add_arguments(parser)
    args = parser.parse_args()
    console = Console(args.console_log_simple)
    spawn_grandchild()
    model.check_tokenizer(args, console)
    datasets = datasets_from_config(args, console) if args.dataset_config else datasets_from_folders(args, console)
    for ds in datasets:
        if ds.resolution is None:
            traceback_exit(
                [script_frame(1913, "<module>", "trainer.train(args)")],
                "AssertionError: resolution is required / resolution（解像度）指定は必須です",
            )
    for ds in datasets:
        check_bucket_range(ds, console)
    scan_images(datasets, console)
    for i, ds in enumerate(datasets):
        console.log(f"[Prepare dataset {i}]")
        make_buckets(ds, console)
    if sum(ds.images_with_repeats for ds in datasets) == 0:
        console.log(NO_DATA, "ERROR")
        return  # kohya's train() just returns: exit 0 with nothing written
    datasets = [ds for ds in datasets if ds.images_with_repeats]
    model.assert_extra_args(args, datasets)
    model.load_model(args, console)
    if args.cache_latents:
        console.log("[Dataset 0]")
        console.log("caching latents with caching strategy.")
        console.log("caching latents...")
        unnamed_bar(sum(len(sub.images) for ds in datasets for sub in ds.subsets),
                    float(os.environ.get("KOHYA_DOUBLE_CACHE_SECONDS", "0")))
    decode_images(datasets)
    model.cache_text_encoder_outputs(args, datasets, console)
    if args.xformers:
        traceback_exit(
            [script_frame(1913, "<module>", "trainer.train(args)")],
            "ImportError: No xformers / xformersがインストールされていないようです",
        )
    train(args, datasets, console, model)


def unnamed_bar(total: int, seconds_per_item: float = 0.0) -> None:
    """The tqdm bar a caching phase draws on stderr, without a description; one redraw per item when each
    takes time (KOHYA_DOUBLE_CACHE_SECONDS), else just its first and last redraw."""
    def draw(done: int, elapsed: float) -> None:
        filled = 10 * done // max(total, 1)
        bar = "█" * filled + " " * (10 - filled)
        rate = f"{seconds_per_item:.2f}s/it" if seconds_per_item >= 1 else f"{1 / max(seconds_per_item, 0.01):.2f}it/s"
        left = seconds_per_item * (total - done)
        sys.stderr.write(f"\r{100 * done // max(total, 1):3d}%|{bar}| {done}/{total} "
                         f"[{_clock(elapsed)}<{_clock(left)}, {rate}]")
        sys.stderr.flush()

    sys.stderr.write(f"\r  0%|          | 0/{total} [00:00<?, ?it/s]")
    sys.stderr.flush()
    if seconds_per_item > 0:
        for done in range(1, total + 1):
            time.sleep(seconds_per_item)
            draw(done, done * seconds_per_item)
        sys.stderr.write("\n")
    else:
        sys.stderr.write(f"\r100%|██████████| {total}/{total} [00:00<00:00, 100.00it/s]\n")
    sys.stderr.flush()


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 60:02d}:{whole % 60:02d}"


if __name__ == "__main__":
    main()
