"""Character LoRA One-Click: a local daemon that trains a character LoRA with kohya sd-scripts for Easy Diffusion."""

__version__ = "0.1.0"
