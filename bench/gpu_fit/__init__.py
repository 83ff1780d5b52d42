"""Benchmark: the automatic memory tier against kohya tuned by hand, on one GPU, in one run (issue 8 §3).

    .venv/bin/python -m bench.gpu_fit --kohya-sd SD --kohya-python PY --sd15-model CKPT \
        [--sdxl-model CKPT] --tokenizer-cache TOK --out bench-out/gpu_fit.json [--budget-s 540]
    .venv/bin/python -m bench.gpu_fit --cpu-smoke ...     # tiny CPU run: proves it end to end, speed meaningless

For each model (SD1.5, then SDXL when given):
1. the standard character job (20 synthetic pictures, the default preset, `memory_tier: auto`) through the real
   daemon: click → LoRA (POST /train accepted → the LoRA file in ED's folder), time to the first step, steady
   images/s (steps/s × the job's batch size, from its progress events, warm-up and previews left out), and peak
   GPU memory (nvidia-smi every 0.5 s: DEVICE-WIDE);
2. kohya's sd-scripts run directly on the same prepared pictures with the fastest flags (bf16, --sdpa,
   --cache_latents; SDXL also the text encoders cached, U-Net only) over an ascending batch-size sweep of a fixed
   number of steps, ending at the first out-of-memory or the first batch slower than the best;
3. the ratio auto ÷ best hand-tuned images/s (goal >= 0.95) and click → LoRA of the SD1.5 job (goal <= 90 s on an
   H100/H200), printed as a table and written with everything else to --out as JSON (after every run, so a
   budget cut still leaves the numbers so far).

Exit code 2, with a sentence per problem, when an input is missing (sd-scripts, kohya's python, a model, the
tokenizers) or, outside the smoke mode, when kohya's torch sees no CUDA GPU. bench/gpu_fit.sh wraps it for a
GPU machine.
"""
