"""TEST DOUBLE of kohya-ss sd-scripts `sdxl_train_network.py` -- NOT the real trainer, trains nothing.

Everything train_network.py (beside this file) does, with SDXL's differences as recorded from sd-scripts
48d368fa in /work/shared/kohya-logs/cpu-sdxl (the real SdxlNetworkTrainer subclasses NetworkTrainer the same way):

- the parser adds `--cache_text_encoder_outputs`, `--cache_text_encoder_outputs_to_disk` (implies the former) and
  `--disable_mmap_load_safetensors` (library/sdxl_train_util.add_sdxl_training_arguments); anything else unknown
  exits 2 as argparse does (e.g. the docs' `--text_encoder_lr1`);
- two tokenizers: `openai/clip-vit-large-patch14` and `laion/CLIP-ViT-bigG-14-laion2B-39B-b160k` from
  `--tokenizer_cache_dir`; offline without the second -> the real TypeError, exit 1 (run 13);
- assert_extra_args after the dataset scan, each with the real message, exit 1: `--v2`; caching text-encoder
  outputs with shuffle_caption / caption dropout / token warmup; `--cache_text_encoder_outputs` without
  `--network_train_unet_only` (run 12); bucket_reso_steps not divisible by 32;
- the base model must be SDXL (header keys `conditioner.embedders.*`), else the real
  `Error(s) in loading state_dict for SdxlUNet2DConditionModel` at the load (run 10);
- SDXL-shaped output: the model-load lines, the `caching Text Encoder outputs` phase with its unnamed tqdm bar,
  `create LoRA for Text Encoder 1:` / `2:` / `264 modules.` / `U-Net: 722 modules.`, three dtype lines;
- an SDXL-shaped LoRA: `lora_unet_*` with SGM names (+ `lora_te1_*` / `lora_te2_*` when the text encoders are
  trained), `ss_base_model_version=sdxl_base_v1-0`, `modelspec.architecture=stable-diffusion-xl-v1-base/lora`.

The knobs (environment) are train_network.py's, all of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported by a test, not run as a script

import train_network as base  # the double beside this file

BIGG = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"

# (module name, in features, out features, 1x1 conv?) -- real SDXL names (kohya-logs/cpu-sdxl/01 *.inspect.json);
# SDXL's proj_in/proj_out are linear. The real file has 722 U-Net, 72 CLIP-L and 192 bigG modules.
SDXL_UNET_MODULES = [
    ("input_blocks_4_1_proj_in", 640, 640, False),
    ("input_blocks_4_1_transformer_blocks_0_attn1_to_k", 640, 640, False),
    ("input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048, 640, False),
    ("middle_block_1_transformer_blocks_0_attn1_to_q", 1280, 1280, False),
    ("output_blocks_0_1_transformer_blocks_9_ff_net_2", 5120, 1280, False),
    ("output_blocks_5_1_proj_out", 640, 640, False),
]
TE1_MODULES = [
    ("text_model_encoder_layers_0_mlp_fc1", 768, 3072),
    ("text_model_encoder_layers_11_self_attn_q_proj", 768, 768),
]
TE2_MODULES = [
    ("text_model_encoder_layers_0_self_attn_k_proj", 1280, 1280),
    ("text_model_encoder_layers_31_mlp_fc2", 5120, 1280),
]
ASSERT_FRAMES = [
    base.script_frame(234, "<module>", "trainer.train(args)"),
    base.script_frame(590, "train", "self.assert_extra_args(args, train_dataset_group, val_dataset_group)"),
]
NOT_CACHEABLE = (
    "AssertionError: when caching Text Encoder output, either caption_dropout_rate, shuffle_caption, "
    "token_warmup_step or caption_tag_dropout_rate cannot be used / Text Encoderの出力をキャッシュするときは"
    "caption_dropout_rate, shuffle_caption, token_warmup_step, caption_tag_dropout_rateは使えません"
)
TE_WITH_CACHE = (
    "AssertionError: network for Text Encoder cannot be trained with caching Text Encoder outputs / "
    "Text Encoderの出力をキャッシュしながらText Encoderのネットワークを学習することはできません"
)


def fail(message: str) -> NoReturn:
    base.traceback_exit(ASSERT_FRAMES, message)


class SdxlModel(base.Sd1Model):
    tokenizer_ids = (base.CLIP_L, BIGG)
    te_modules_created = 264  # 72 (CLIP-L) + 192 (bigG)
    unet_modules_created = 722
    base_model_version = "sdxl_base_v1-0"
    architecture = "stable-diffusion-xl-v1-base/lora"
    implementation = "https://github.com/Stability-AI/generative-models"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        flag = {"action": "store_true"}
        parser.add_argument("--cache_text_encoder_outputs", **flag)
        parser.add_argument("--cache_text_encoder_outputs_to_disk", **flag)
        parser.add_argument("--disable_mmap_load_safetensors", **flag)

    def tokenizer_preamble(self, console: base.Console) -> None:
        """SDXL prints no "Using v1 tokenizer"."""

    def assert_extra_args(self, args: argparse.Namespace, datasets: list[base.Dataset]) -> None:
        # sdxl_train_util.verify_sdxl_training_args, then SdxlNetworkTrainer.assert_extra_args, in their order
        if args.v2:
            fail("AssertionError: v2 cannot be enabled in SDXL training / SDXL学習ではv2を有効にすることはできません")
        if args.cache_text_encoder_outputs_to_disk:
            args.cache_text_encoder_outputs = True
        if args.cache_text_encoder_outputs:
            if not all(sub.text_encoder_output_cacheable for ds in datasets for sub in ds.subsets):
                fail(NOT_CACHEABLE)
            if not args.network_train_unet_only:
                fail(TE_WITH_CACHE)
        for ds in datasets:
            steps = ds.buckets.steps
            if steps % 32:
                fail(f"AssertionError: bucket_reso_steps is {steps}. it must be divisible by 32.\n"
                     f"bucket_reso_stepsが{steps}です。32で割り切れる必要があります")

    def load_parts(self, path: str, console: base.Console) -> None:
        keys = base.checkpoint_keys(path)
        console.log("building U-Net")
        console.log("loading U-Net from checkpoint")
        if keys is not None and not base.is_sdxl(keys):
            # Run 10: an SD 1.x file has none of SDXL's U-Net keys.
            base.state_dict_error("SdxlUNet2DConditionModel", [
                'Unexpected key(s) in state_dict: "output_blocks.7.1.transformer_blocks.0.attn2.to_q.weight", '
                '"input_blocks.9.0.op.weight". ',
                'Missing key(s) in state_dict: "output_blocks.2.1.transformer_blocks.5.norm3.weight", '
                '"middle_block.1.transformer_blocks.6.ff.net.0.proj.weight". ',
            ], base.LOAD_FRAMES)
        console.log("U-Net: <All keys matched successfully>")
        console.log("building text encoders")
        console.log("loading text encoders from checkpoint")
        console.log("text encoder 1: <All keys matched successfully>")
        console.log("text encoder 2: <All keys matched successfully>")
        console.log("building VAE")
        console.log("loading VAE from checkpoint")
        console.log("VAE: <All keys matched successfully>")

    def cache_text_encoder_outputs(self, args: argparse.Namespace, datasets: list[base.Dataset],
                                   console: base.Console) -> None:
        if not args.cache_text_encoder_outputs:
            return
        if not args.lowram:
            console.log("move vae and unet to cpu to save memory")
        for i, ds in enumerate(datasets):
            console.log(f"[Dataset {i}]")
            console.log("caching Text Encoder outputs with caching strategy.")
            console.log("checking cache validity...")
            console.log("caching Text Encoder outputs...")
            base.unnamed_bar(sum(len(sub.images) for sub in ds.subsets))
        if not args.lowram:
            console.log("move vae and unet back to original device")

    def dtype_lines(self, args: argparse.Namespace, dtype: str, device: str) -> list[str]:
        # The text encoders stay fp32 on the CPU after caching (SdxlNetworkTrainer moves them back as float32).
        return [f"unet dtype: {dtype}, device: {device}",
                f"text_encoder [0] dtype: torch.float32, device: {device}",
                f"text_encoder [1] dtype: torch.float32, device: {device}"]

    def network_lines(self, args: argparse.Namespace, console: base.Console, dim: int) -> None:
        console.log(f"create LoRA network. base dim (rank): {dim}, alpha: {float(args.network_alpha)}")
        console.log("neuron dropout: p=None, rank dropout: p=None, module dropout: p=None")
        console.log("create LoRA for Text Encoder 1:")
        console.log("create LoRA for Text Encoder 2:")
        console.log(f"create LoRA for Text Encoder: {self.te_modules_created} modules.")
        console.log(f"create LoRA for U-Net: {self.unet_modules_created} modules.")
        if not args.network_train_unet_only:
            console.log(f"enable LoRA for text encoder: {self.te_modules_created} modules")
        console.log(f"enable LoRA for U-Net: {self.unet_modules_created} modules")

    def lora_modules(self) -> tuple[dict[str, list[tuple[str, int, int]]], list[tuple[str, int, int, bool]]]:
        return {"lora_te1": TE1_MODULES, "lora_te2": TE2_MODULES}, SDXL_UNET_MODULES

    def modelspec_resolution(self, args: argparse.Namespace) -> str:
        reso = args.resolution or "1024"
        parts = [p.strip() for p in str(reso).split(",")]
        return f"{parts[0]}x{parts[-1]}"


if __name__ == "__main__":
    base.main(SdxlModel())
