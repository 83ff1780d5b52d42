"""The kohya contract builders: argv, environment and the --dataset_config document."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from daemon.pipeline.buckets import bucket_counts, bucket_of, prep_size
from daemon.pipeline.dataset import Upload, prepare_images
from daemon.pipeline.kohya import (
    KohyaLaunch,
    build_command,
    build_env,
    dataset_config,
    lever_problem,
    script_for,
    write_dataset_config,
)
from daemon.pipeline.params import PRESETS, TrainParams, resolve_params, total_steps
from tests.helpers import KOHYA_DOUBLE, KOHYA_SDXL_DOUBLE, write_sd1_checkpoint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

GPU = resolve_params({}, image_count=20, cpu=False)
CPU = resolve_params({}, image_count=20, cpu=True)


def launch(**changes: object) -> KohyaLaunch:
    base = KohyaLaunch(
        script_path="/opt/sd-scripts/train_network.py",
        workspace="/opt/sd-scripts",
        accelerate_bin="/opt/venv/bin/accelerate",
        python="/opt/venv/bin/python",
        base_model="/models/sd15 model.safetensors",
        dataset_config="/jobs/j1/dataset.toml",
        output_dir="/jobs/j1/out",
        output_name="Test_Hero",
        logging_dir="/jobs/j1/logs",
        tokenizer_cache_dir="/opt/tokenizers",
        extra_args=(),
        cpu=False,
        trigger="ohwx",
        job_id="j1",
    )
    return dataclasses.replace(base, **changes)


def value(argv: list[str], flag: str) -> str:
    """The value of `flag`, whether passed as `--flag value` or glued as `--flag=value`."""
    glued = [a.split("=", 1)[1] for a in argv if a.startswith(f"{flag}=")]
    assert argv.count(flag) + len(glued) == 1, f"{flag} appears {argv.count(flag) + len(glued)} times"
    return glued[0] if glued else argv[argv.index(flag) + 1]


def script_args(argv: list[str], script: str = "/opt/sd-scripts/train_network.py") -> list[str]:
    return argv[argv.index(script) + 1 :]


@pytest.fixture(scope="module")
def double() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kohya_double_train_network", KOHYA_DOUBLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_form_runs_the_script_directly_as_a_list() -> None:
    argv = build_command(GPU, launch())
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[:3] == ["/opt/venv/bin/python", "-u", "/opt/sd-scripts/train_network.py"]
    assert "launch" not in argv
    # A path with a space stays one argument: nothing is ever joined into a shell string.
    assert value(argv, "--pretrained_model_name_or_path") == "/models/sd15 model.safetensors"


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--pretrained_model_name_or_path", "/models/sd15 model.safetensors"),
        ("--dataset_config", "/jobs/j1/dataset.toml"),
        ("--output_dir", "/jobs/j1/out"),
        ("--output_name", "Test_Hero"),
        ("--save_model_as", "safetensors"),
        ("--save_precision", "fp16"),
        ("--network_module", "networks.lora"),
        ("--network_dim", "32"),
        ("--network_alpha", "16.0"),
        ("--learning_rate", "0.0001"),
        ("--unet_lr", "0.0001"),
        ("--text_encoder_lr", "5e-05"),
        ("--optimizer_type", "AdamW8bit"),
        ("--lr_scheduler", "cosine"),
        ("--lr_warmup_steps", "0.05"),
        ("--max_train_epochs", "10"),
        ("--save_every_n_epochs", "2"),
        ("--mixed_precision", "fp16"),
        ("--seed", "42"),
        ("--max_data_loader_n_workers", "0"),
        ("--tokenizer_cache_dir", "/opt/tokenizers"),
        ("--logging_dir", "/jobs/j1/logs"),
        ("--training_comment", "job=j1; trigger=ohwx"),
        ("--metadata_trigger_phrase", "ohwx"),
        ("--metadata_title", "Test_Hero"),
    ],
)
def test_gpu_argv_carries_each_setting_once(flag: str, expected: str) -> None:
    assert value(build_command(GPU, launch()), flag) == expected


@pytest.mark.parametrize(
    ("flag", "gpu", "cpu"),
    [
        ("--cache_latents", True, True),
        ("--console_log_simple", True, True),
        ("--sdpa", True, False),  # ~4x slower than kohya's own attention on a CPU
        ("--gradient_checkpointing", False, False),
        ("--xformers", False, False),
        ("--network_train_unet_only", False, False),
    ],
)
def test_switches_per_device(flag: str, gpu: bool, cpu: bool) -> None:
    assert (flag in build_command(GPU, launch())) is gpu
    assert (flag in build_command(CPU, launch(cpu=True))) is cpu


def test_cpu_argv_uses_the_cpu_safe_params() -> None:
    argv = build_command(CPU, launch(cpu=True))
    assert value(argv, "--mixed_precision") == "no"
    assert value(argv, "--optimizer_type") == "AdamW"


def test_text_encoder_lr_zero_trains_the_unet_only() -> None:
    argv = build_command(dataclasses.replace(GPU, text_encoder_lr=0.0), launch())
    assert "--network_train_unet_only" in argv
    assert "--text_encoder_lr" not in argv


def test_final_only_omits_the_epoch_save_interval() -> None:
    argv = build_command(dataclasses.replace(GPU, save_every_n_epochs=0), launch())
    assert "--save_every_n_epochs" not in argv
    assert "--save_state" not in argv  # no epoch saves, no states (kohya saves them together)


def test_each_epoch_save_also_saves_the_newest_training_state_only() -> None:
    argv = build_command(GPU, launch())
    i = argv.index("--save_every_n_epochs")
    assert argv[i:i + 5] == ["--save_every_n_epochs", "2", "--save_state", "--save_last_n_epochs_state", "1"]
    assert "--resume" not in argv and "--initial_epoch" not in argv


def test_a_resumed_launch_names_the_state_and_the_next_epoch() -> None:
    # --initial_epoch always: a state written by a resumed launch records a relative step (FACTS.md runs f, g)
    argv = build_command(GPU, launch(resume_state="/jobs/j1/output/Test_Hero-000004-state", initial_epoch=5))
    i = argv.index("--resume")
    assert argv[i:i + 4] == ["--resume", "/jobs/j1/output/Test_Hero-000004-state", "--initial_epoch", "5"]
    assert "--skip_until_initial_step" not in argv  # no effect for epoch states (FACTS.md §5)
    assert argv.count("--save_state") == 1


def test_optional_dirs_are_left_out_when_unset() -> None:
    argv = build_command(GPU, launch(tokenizer_cache_dir=None, logging_dir=None))
    assert "--tokenizer_cache_dir" not in argv and "--logging_dir" not in argv


def test_adafactor_is_told_to_use_our_learning_rates() -> None:
    argv = build_command(dataclasses.replace(GPU, optimizer="Adafactor"), launch())
    i = argv.index("--optimizer_args")
    assert argv[i + 1 : i + 4] == ["scale_parameter=False", "relative_step=False", "warmup_init=False"]
    assert argv[i + 4].startswith("--")  # nargs="*" stops at the next option


def test_extra_args_come_last() -> None:
    argv = build_command(GPU, launch(extra_args=("--noise_offset", "0.05", "--min_snr_gamma", "5")))
    assert argv[-4:] == ["--noise_offset", "0.05", "--min_snr_gamma", "5"]


def test_float_arguments_parse_back_exactly() -> None:
    p = dataclasses.replace(GPU, unet_lr=3e-4, text_encoder_lr=1.5e-5, network_alpha=0.5)
    argv = build_command(p, launch())
    assert float(value(argv, "--unet_lr")) == 3e-4
    assert float(value(argv, "--text_encoder_lr")) == 1.5e-5
    assert float(value(argv, "--network_alpha")) == 0.5


@pytest.mark.parametrize("cpu", [False, True])
def test_accelerate_form(cpu: bool) -> None:
    p = CPU if cpu else GPU
    argv = build_command(p, launch(python=None, cpu=cpu))
    head = argv[: argv.index("/opt/sd-scripts/train_network.py")]
    expected = [
        "/opt/venv/bin/accelerate",
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        p.mixed_precision,
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "2",
    ]
    assert head == [*expected, "--cpu"] if cpu else head == expected
    # kohya hands its own --mixed_precision to Accelerator(): the script needs it too.
    assert value(script_args(argv), "--mixed_precision") == p.mixed_precision


@pytest.mark.parametrize("params", [GPU, CPU, dataclasses.replace(GPU, text_encoder_lr=0.0, optimizer="Adafactor")])
def test_every_flag_is_one_kohyas_parser_knows(double: ModuleType, params: TrainParams) -> None:
    # The double's parser uses kohya's option names and types; the real parser accepted the same argv
    # (tests/fixtures/real_kohya_proof.md).
    args = double.build_parser().parse_args(script_args(build_command(params, launch())))
    assert args.network_dim == params.network_dim
    assert args.max_train_epochs == params.epochs
    assert args.console_log_simple


def test_script_flags_are_not_repeated() -> None:
    flags = [a for a in script_args(build_command(GPU, launch())) if a.startswith("--")]
    assert len(flags) == len(set(flags))


# --------------------------------------------------------------------------------------------- env
@pytest.mark.parametrize(
    ("tokenizer", "cpu", "present", "absent"),
    [
        ("/tok", False, {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}, {"ACCELERATE_USE_CPU"}),
        (None, False, set(), {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ACCELERATE_USE_CPU"}),
        ("/tok", True, {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ACCELERATE_USE_CPU"}, set()),
        (None, True, {"ACCELERATE_USE_CPU"}, {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}),
    ],
)
def test_build_env(tokenizer: str | None, cpu: bool, present: set[str], absent: set[str]) -> None:
    base = {"PATH": "/usr/bin", "HOME": "/home/u", "PYTHONUNBUFFERED": "0"}
    env = build_env(base, tokenizer_cache_dir=tokenizer, cpu=cpu)
    always = {
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONUTF8": "1",
        "COLUMNS": "1000",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    assert always.items() <= env.items()
    assert all(env[k] == "1" for k in present)
    assert not absent & env.keys()
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/home/u"
    assert base["PYTHONUNBUFFERED"] == "0"  # the caller's mapping is not modified
    assert all(isinstance(v, str) for v in env.values())


# ------------------------------------------------------------------------------------ dataset TOML
def test_dataset_config_document() -> None:
    p = dataclasses.replace(CPU, resolution=768, batch_size=3, repeats=7)
    cfg = dataset_config(image_dir="/jobs/j1/img", class_tokens="ohwx person", params=p)
    assert cfg == {
        "general": {
            "caption_extension": ".txt",
            "shuffle_caption": True,
            "keep_tokens": 1,
            "resolution": 768,
            "batch_size": 3,
            # kohya buckets by aspect ratio; no_upscale: each bucket is the picture's own size rounded down
            "enable_bucket": True,
            "bucket_no_upscale": True,
            "bucket_reso_steps": 64,
            # ignored with no_upscale but asserted min <= resolution <= max: the range prep really produces
            "min_bucket_reso": 64,
            "max_bucket_reso": 1920,  # sqrt(6) * 768 rounded up to 64: the longest side of a 1:6 picture
        },
        "datasets": [{"subsets": [{"image_dir": "/jobs/j1/img", "num_repeats": 7, "class_tokens": "ohwx person"}]}],
    }
    general, subset = cfg["general"], cfg["datasets"][0]["subsets"][0]
    # voluptuous checks with isinstance: exact Python types matter, not just equal values.
    assert type(general["resolution"]) is int and type(general["batch_size"]) is int
    assert type(general["keep_tokens"]) is int and type(subset["num_repeats"]) is int
    assert type(general["shuffle_caption"]) is bool and type(general["enable_bucket"]) is bool
    assert all(type(general[k]) is int for k in ("bucket_reso_steps", "min_bucket_reso", "max_bucket_reso"))


@pytest.mark.parametrize("resolution", [256, 512, 576, 1024])  # resolve_params accepts 256-1024
def test_bucket_range_satisfies_kohyas_asserts_and_spans_every_accepted_picture(resolution: int) -> None:
    general = dataset_config(image_dir="/i", class_tokens="x", params=dataclasses.replace(CPU, resolution=resolution))[
        "general"]
    step = general["bucket_reso_steps"]
    # kohya: steps divisible by 64 for SD1; min <= min(resolution) and max >= max(resolution), or it asserts
    assert step % 64 == 0 and general["min_bucket_reso"] % step == 0 and general["max_bucket_reso"] % step == 0
    assert general["min_bucket_reso"] <= resolution <= general["max_bucket_reso"]
    for size in [(64, 384), (384, 64), (4000, 3000), (1000, 6000), (6000, 1000), (300, 300)]:
        bucket = bucket_of(prep_size(size, resolution), resolution)
        assert general["min_bucket_reso"] <= min(bucket) and max(bucket) <= general["max_bucket_reso"]


def test_dataset_config_passes_kohyas_schema(double: ModuleType) -> None:
    for p in (GPU, CPU, PRESETS["quality"]):
        double.validate_user_config(dataset_config(image_dir="/img", class_tokens="ohwx", params=p))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["datasets"][0].update(network_multiplier=1), "expected float"),
        (lambda c: c["general"].update(batch_size=2.0), "expected int"),
        (lambda c: c["datasets"][0]["subsets"][0].update(name="x"), "extra keys not allowed"),
        (lambda c: c["datasets"][0]["subsets"][0].pop("image_dir"), "required key not provided"),
    ],
)
def test_the_schema_check_catches_kohyas_type_traps(double: ModuleType, mutate, message: str) -> None:
    cfg = dataset_config(image_dir="/img", class_tokens="ohwx", params=GPU)
    mutate(cfg)
    with pytest.raises(double.ConfigInvalid, match=message):
        double.validate_user_config(cfg)


@pytest.mark.parametrize("image_dir", ["/jobs/j1/img", r"C:\Users\me\ED LoRA\jobs\j1\img", "/tmp/ünïcödé 'q\" img"])
def test_dataset_toml_round_trips_with_exact_types(tmp_path: Path, image_dir: str) -> None:
    cfg = dataset_config(image_dir=image_dir, class_tokens="ohwx person", params=GPU)
    cfg["datasets"][0]["network_multiplier"] = 1.0  # a float slot: 1.0 must not come back as 1
    path = tmp_path / "dataset.toml"
    write_dataset_config(path, cfg)
    loaded = tomllib.loads(path.read_text(encoding="utf-8"))
    assert loaded == cfg
    assert type(loaded["datasets"][0]["network_multiplier"]) is float
    assert type(loaded["general"]["resolution"]) is int
    assert loaded["datasets"][0]["subsets"][0]["image_dir"] == image_dir


def test_write_dataset_config_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "dataset.toml"
    path.write_text("stale = true\n")
    write_dataset_config(path, dataset_config(image_dir="/img", class_tokens="ohwx", params=GPU))
    assert "stale" not in path.read_text()
    assert os.listdir(tmp_path) == ["dataset.toml"]  # no temp file left behind


def test_previews_need_both_the_param_and_a_prompt_file() -> None:
    assert "--sample_prompts" not in build_command(GPU, launch())  # no prompt file written
    argv = build_command(GPU, launch(sample_prompts="/jobs/j1/sample_prompts.txt"))
    assert value(argv, "--sample_prompts") == "/jobs/j1/sample_prompts.txt"
    assert value(argv, "--sample_every_n_epochs") == str(GPU.sample_every_n_epochs)
    assert value(argv, "--sample_sampler") == "euler_a"
    assert "--sample_prompts" not in build_command(CPU, launch(sample_prompts="/p.txt"))  # CPU default: none


def test_sample_prompt_line_uses_kohya_prompt_options() -> None:
    from daemon.pipeline.kohya import sample_prompt_file

    text = sample_prompt_file(trigger="ohwx", class_token="woman", params=GPU, cpu=False)
    assert text.endswith("\n") and text.count("\n") == 1
    prompt, _, options = text.strip().partition(" --")
    assert prompt == "ohwx woman, portrait, looking at viewer"
    opts = dict(o.split(" ", 1) for o in options.split(" --"))
    assert opts["w"] == opts["h"] == str(GPU.resolution)
    assert opts["d"] == str(GPU.seed) and int(opts["s"]) > 0 and opts["n"] == "lowres, blurry"


def test_prep_toml_and_step_estimate_agree_with_kohyas_buckets(tmp_path: Path) -> None:
    """Pictures of three shapes, prepped, then the kohya double (bucketing as kohya does) run on the TOML."""
    shapes = [(4000, 3000)] * 5 + [(3000, 4000)] * 3 + [(800, 800)] * 2 + [(300, 200)]
    uploads = []
    for i, size in enumerate(shapes):
        path = tmp_path / f"{i + 1:03d}.upload"
        Image.new("RGB", size, (i * 20, 90, 160)).save(path, format="JPEG", quality=80)
        uploads.append(Upload(path, f"pic{i}.jpg"))
    params = dataclasses.replace(CPU, resolution=512, repeats=3, batch_size=2, epochs=2, save_every_n_epochs=0)
    prepared = prepare_images(uploads, tmp_path / "img", size=512, text="ohwx woman")
    counts = bucket_counts((p.size for p in prepared), 512)
    assert counts == {(512, 384): 5, (384, 512): 3, (512, 512): 2, (256, 192): 1}
    config = tmp_path / "dataset.toml"
    write_dataset_config(config, dataset_config(image_dir=str(tmp_path / "img"), class_tokens="woman", params=params))
    (tmp_path / "tok" / "openai_clip-vit-large-patch14").mkdir(parents=True)
    argv = build_command(params, launch(
        python=sys.executable, script_path=str(KOHYA_DOUBLE), workspace=str(tmp_path), dataset_config=str(config),
        base_model=str(write_sd1_checkpoint(tmp_path / "m.safetensors")), output_dir=str(tmp_path / "out"),
        logging_dir=None, tokenizer_cache_dir=str(tmp_path / "tok"), cpu=True))
    env = build_env(os.environ, tokenizer_cache_dir=str(tmp_path / "tok"), cpu=True)
    done = subprocess.run(argv, cwd=tmp_path, env={**env, "KOHYA_DOUBLE_STEP_SECONDS": "0"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [ln for ln in lines if ln.startswith("bucket ")] == [
        "bucket 0: resolution (256, 192), count: 3",
        "bucket 1: resolution (384, 512), count: 9",
        "bucket 2: resolution (512, 384), count: 15",
        "bucket 3: resolution (512, 512), count: 6",
    ]
    # 2 + 5 + 8 + 3 batches per epoch: more than ceil(33 / 2) = 17 because no batch mixes buckets
    expected = total_steps(params, counts.values())
    assert expected == (2 + 5 + 8 + 3) * 2
    assert f"  total optimization steps / 学習ステップ数: {expected}" in lines


def test_the_doubles_bucketing_matches_ours_on_any_size(double: ModuleType) -> None:
    """Two implementations written from kohya's BucketManager (the double's and the daemon's) agree."""
    rng = random.Random(3)
    for _ in range(2000):
        resolution = rng.choice([256, 512, 768, 1024])
        short = rng.randint(64, 3000)
        size = (short, rng.randint(short, short * 6))
        size = size if rng.random() < 0.5 else (size[1], size[0])
        ds = double.Dataset((resolution, resolution), 1, [], double.Buckets(True, True, 64, 4096, 64))
        assert double.select_bucket(ds, size, []) == bucket_of(size, resolution)
        assert double.select_bucket(ds, prep_size(size, resolution), []) == bucket_of(size, resolution)


# -------------------------------------------------------------------------------------------- SDXL
# What fit.py sets for SDXL on a GPU card of the 12-24 GB tiers: U-Net only with cached text-encoder outputs.
SDXL_GPU = dataclasses.replace(GPU, arch="sdxl", resolution=1024, text_encoder_lr=0.0, cache_text_encoder_outputs=True,
                               gradient_checkpointing=True, memory_tier="16gb")
SDXL_SCRIPT = "/opt/sd-scripts/sdxl_train_network.py"
# Flags kohya's docs show or parse for SDXL that must never be emitted: no effect on a LoRA, or no such flag.
SDXL_TRAPS = ("--fused_backward_pass", "--blocks_to_swap", "--cpu_offload_checkpointing", "--text_encoder_lr1",
              "--text_encoder_lr2", "--v2", "--full_fp16")


def sdxl_launch(**changes: object) -> KohyaLaunch:
    return launch(script_path=SDXL_SCRIPT, base_model="/models/sd_xl_base_1.0.safetensors", **changes)


@pytest.fixture(scope="module")
def sdxl_double() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kohya_double_sdxl_train_network", KOHYA_SDXL_DOUBLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sdxl_parser(sdxl_double: ModuleType):  # type: ignore[no-untyped-def]
    parser = sdxl_double.base.build_parser()
    sdxl_double.SdxlModel().add_arguments(parser)
    return parser


def test_script_follows_the_base_models_family() -> None:
    configured = Path("/opt/sd-scripts/train_network.py")
    assert script_for("sdxl", configured) == Path(SDXL_SCRIPT)
    assert script_for("sd1", configured) == configured
    argv = build_command(SDXL_GPU, sdxl_launch())
    assert argv[:3] == ["/opt/venv/bin/python", "-u", SDXL_SCRIPT]


def test_sdxl_gpu_argv_has_the_sdxl_levers_once_and_no_traps() -> None:
    args = script_args(build_command(SDXL_GPU, sdxl_launch()), SDXL_SCRIPT)
    for flag in ("--cache_text_encoder_outputs", "--network_train_unet_only", "--gradient_checkpointing",
                 "--no_half_vae", "--sdpa", "--cache_latents", "--console_log_simple"):
        assert args.count(flag) == 1, flag
    assert "--text_encoder_lr" not in args  # the text encoders are not trained while their outputs are cached
    assert "--fp8_base" not in args
    assert not set(SDXL_TRAPS) & set(args)
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    assert len(flags) == len(set(flags))
    # what the metadata and the user see stays as for SD 1.x
    assert value(args, "--metadata_trigger_phrase") == "ohwx"
    assert value(args, "--training_comment") == "job=j1; trigger=ohwx"
    assert value(args, "--network_module") == "networks.lora"


@pytest.mark.parametrize(
    ("changes", "present", "absent"),
    [
        ({"mixed_precision": "bf16"}, set(), {"--no_half_vae"}),  # bf16's range keeps the VAE finite
        ({"mixed_precision": "bf16", "fp8_base": True}, {"--fp8_base"}, {"--no_half_vae"}),
        ({"fp8_base": True}, {"--fp8_base", "--no_half_vae"}, set()),
        ({"gradient_checkpointing": False}, set(), {"--gradient_checkpointing"}),
        ({"cache_text_encoder_outputs": False, "text_encoder_lr": 5e-5}, {"--text_encoder_lr"},
         {"--cache_text_encoder_outputs", "--network_train_unet_only"}),
        ({"cache_text_encoder_outputs": False}, {"--network_train_unet_only"}, {"--cache_text_encoder_outputs"}),
    ],
)
def test_sdxl_levers_follow_the_params(changes: dict[str, object], present: set[str], absent: set[str]) -> None:
    args = script_args(build_command(dataclasses.replace(SDXL_GPU, **changes), sdxl_launch()), SDXL_SCRIPT)
    assert present <= set(args) and not absent & set(args)


def test_sdxl_on_the_cpu_keeps_sdpa_off_and_the_vae_in_the_training_dtype() -> None:
    cpu = dataclasses.replace(SDXL_GPU, mixed_precision="no", optimizer="AdamW", memory_tier="cpu")
    args = script_args(build_command(cpu, sdxl_launch(cpu=True)), SDXL_SCRIPT)
    assert "--sdpa" not in args and "--no_half_vae" not in args
    assert {"--cache_text_encoder_outputs", "--network_train_unet_only", "--gradient_checkpointing"} <= set(args)


def test_sd1_argv_changes_only_by_gradient_checkpointing() -> None:
    before = build_command(GPU, launch())
    with_gc = build_command(dataclasses.replace(GPU, gradient_checkpointing=True), launch())
    assert [a for a in with_gc if a != "--gradient_checkpointing"] == before
    assert with_gc.count("--gradient_checkpointing") == 1
    # train_network.py has no --cache_text_encoder_outputs: an SD 1.x run ignores the SDXL-only field
    cached = build_command(dataclasses.replace(GPU, cache_text_encoder_outputs=True), launch())
    assert cached == before


@pytest.mark.parametrize("params", [
    SDXL_GPU,
    dataclasses.replace(SDXL_GPU, mixed_precision="bf16", fp8_base=True, optimizer="Adafactor"),
    dataclasses.replace(SDXL_GPU, cache_text_encoder_outputs=False, text_encoder_lr=5e-5),
])
def test_every_sdxl_flag_is_one_the_sdxl_parser_knows(sdxl_double: ModuleType, params: TrainParams) -> None:
    # The SDXL double's parser is the SD1 one plus sdxl_train_network's additions; the real parser accepted
    # these argvs too (the opt-in tests/test_real_kohya.py::test_real_sdxl_parser_and_asserts_accept_the_argv).
    args = sdxl_parser(sdxl_double).parse_args(script_args(build_command(params, sdxl_launch()), SDXL_SCRIPT))
    assert args.cache_text_encoder_outputs is params.cache_text_encoder_outputs
    assert args.network_train_unet_only is (params.text_encoder_lr == 0)
    assert args.gradient_checkpointing and args.fp8_base is params.fp8_base


def test_the_sd1_parser_would_refuse_the_sdxl_only_flag(double: ModuleType) -> None:
    with pytest.raises(SystemExit):
        double.build_parser().parse_args(["--cache_text_encoder_outputs"])


def test_sdxl_dataset_toml_does_not_shuffle_cached_captions(sdxl_double: ModuleType) -> None:
    cached = dataset_config(image_dir="/img", class_tokens="ohwx", params=SDXL_GPU)["general"]
    assert cached["shuffle_caption"] is False
    assert cached["bucket_reso_steps"] % 32 == 0  # SdxlNetworkTrainer.assert_extra_args
    assert cached["resolution"] == 1024 and cached["min_bucket_reso"] <= 1024 <= cached["max_bucket_reso"]
    trained = dataset_config(image_dir="/img", class_tokens="ohwx",
                             params=dataclasses.replace(SDXL_GPU, cache_text_encoder_outputs=False))["general"]
    assert trained["shuffle_caption"] is True
    cfg = dataset_config(image_dir="/img", class_tokens="ohwx", params=SDXL_GPU)
    sdxl_double.base.validate_user_config(cfg)


def test_sdxl_preview_is_drawn_at_the_training_resolution() -> None:
    from daemon.pipeline.kohya import sample_prompt_file

    text = sample_prompt_file(trigger="ohwx", class_token="woman", params=SDXL_GPU, cpu=False)
    assert " --w 1024 --h 1024 " in text


def test_fp8_without_mixed_precision_is_named_before_a_run() -> None:
    assert lever_problem(SDXL_GPU) is None
    assert lever_problem(dataclasses.replace(SDXL_GPU, mixed_precision="bf16", fp8_base=True)) is None
    problem = lever_problem(dataclasses.replace(SDXL_GPU, mixed_precision="no", fp8_base=True))
    assert problem and "fp8_base needs mixed_precision fp16 or bf16, not no" in problem


def test_training_plan_names_the_script_and_the_levers() -> None:
    from daemon.pipeline.runner import training_plan

    assert training_plan(SDXL_GPU, "sdxl_train_network.py", cpu=False) == (
        "training SDXL with sdxl_train_network.py on the GPU: tier 16gb, batch 2, fp16, gradient checkpointing, "
        "text encoders cached, no fp8")
    assert training_plan(CPU, "train_network.py", cpu=True) == (
        "training SD 1.x with train_network.py on the CPU: tier cpu, batch 2, fp32, no gradient checkpointing, no fp8")
