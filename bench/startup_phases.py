#!/usr/bin/env python3
"""Where kohya's start-up time goes: the phase table of one or more harness capture folders.

Standalone research tool (issue 9 §3), not imported by product code. kohya's --console_log_simple lines carry no
timestamps, so each phase boundary is the arrival time (chunks.jsonl, seconds since launch) of the chunk holding the
first byte of a marker line, in stdout.log or stderr.log of a folder written by ../shared/harness/capture.py.

  python bench/startup_phases.py CAPTURE_DIR [CAPTURE_DIR ...]      # one column per folder, plus the median

The markers are kohya's own lines at sd-scripts 48d368fa (train_network.py, library/train_util.py, model_util.py);
the daemon's parser (daemon/pipeline/progress.py) knows only the coarse phases 'loading model' / 'caching latents',
so it is not reused here.
"""
from __future__ import annotations

import bisect
import json
import re
import statistics
import sys
from pathlib import Path

# (label of the phase that ENDS at this marker, regex of the marker). Order = kohya's order.
MARKERS: list[tuple[str, bytes]] = [
    ("python + imports (torch, diffusers, transformers, bitsandbytes...)",
     rb"load tokenizer from cache|Using v1 tokenizer"),
    ("tokenizer + dataset scan + Accelerator()", rb"loading model for process"),
    ("checkpoint read + U-Net convert/load", rb"loading u-net: |U-Net converted to original U-Net"),
    ("VAE convert/load", rb"loading vae: |U-Net converted to original U-Net"),
    ("text encoder convert/load", rb"loading text encoder: |U-Net converted to original U-Net"),
    ("move to device, strategies", rb"caching latents\.\.\."),
    ("caching latents (VAE encode of every picture)", rb"import network module"),
    ("create + apply LoRA", rb"prepare optimizer, data loader"),
    ("optimizer, dataloader, accelerator.prepare", rb"running training /"),
    ("metadata incl. sha256 of the checkpoint, trackers", rb"unet dtype: "),
    ("to the 'steps:' bar", rb"steps: +0%"),
    ("first training step", rb"steps: +\d+%\|[^|\r\n]*\| *1/"),
]


def arrival_times(d: Path) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {"stdout": ([], []), "stderr": ([], [])}
    for line in (d / "chunks.jsonl").read_text().splitlines():
        c = json.loads(line)
        out[c["stream"]][0].append(c["offset"])
        out[c["stream"]][1].append(c["t"])
    return out


def marker_times(d: Path, markers: list[tuple[str, bytes]] | None = None) -> list[float | None]:
    chunks = arrival_times(d)
    logs = {s: (d / f"{s}.log").read_bytes() for s in ("stdout", "stderr")}
    times: list[float | None] = []
    for _, rx in MARKERS if markers is None else markers:
        best = None
        for s, data in logs.items():
            m = re.search(rx, data)
            if m:
                offs, ts = chunks[s]
                t = ts[bisect.bisect_right(offs, m.start()) - 1]
                best = t if best is None else min(best, t)
        times.append(best)
    return times


def phases(d: Path) -> list[float | None]:
    """Seconds spent in each phase (None when its end marker is missing, e.g. the diffusers path has no
    separate VAE/text-encoder lines: their time is then counted in the U-Net row)."""
    ends = marker_times(d)
    out: list[float | None] = []
    prev = 0.0
    for t in ends:
        if t is None:
            out.append(None)
            continue
        out.append(round(t - prev, 2))
        prev = t
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    dirs = [Path(a) for a in argv]
    cols = [phases(d) for d in dirs]
    ends = [marker_times(d) for d in dirs]
    names = [d.name for d in dirs]
    print("| phase (ends at kohya's line) | " + " | ".join(names) + " | median |")
    print("|---|" + "---|" * (len(names) + 1))
    for i, (label, _) in enumerate(MARKERS):
        vals = [c[i] for c in cols]
        got = [v for v in vals if v is not None]
        med = f"{statistics.median(got):.2f}" if got else "-"
        print(f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + f" | {med} |")
    for label, idx in (("launch → 'steps:' bar", len(MARKERS) - 2), ("launch → first step done", len(MARKERS) - 1)):
        vals = [e[idx] for e in ends]
        got = [v for v in vals if v is not None]
        med = f"{statistics.median(got):.2f}" if got else "-"
        print(f"| **{label}** | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + f" | {med} |")
    # Runs through tests/fixtures/kohya_startup/prestart_wrapper.py: imports happen before the daemon says "go".
    gos = [marker_times(d, [("go", rb"\[prestart\] go")])[0] for d in dirs]
    if any(g is not None for g in gos):
        vals = [None if g is None or e[-2] is None else e[-2] - g for g, e in zip(gos, ends, strict=True)]
        got = [v for v in vals if v is not None]
        print("| **'[prestart] go' → 'steps:' bar** | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals)
              + f" | {statistics.median(got):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
