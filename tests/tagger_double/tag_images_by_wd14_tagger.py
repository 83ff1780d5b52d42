"""TEST DOUBLE of kohya-ss sd-scripts `finetune/tag_images_by_wd14_tagger.py` -- NOT the real tagger, no model.

Run exactly like the real script (`python tag_images_by_wd14_tagger.py <dir> [options]`) and keeps its observable
contract at 48d368fa, as recorded in tests/fixtures/wd14_tagger/FACTS.md:

- argparse with the real option set, names, types and defaults (`setup_parser`, L602-762) and the same
  post-processing (`--caption_extention` alias, every unset threshold takes `--thresh`); a wrong flag or value
  exits 2 with `error:` on stderr;
- the model check of L120-181: the folder `<model_dir>/<repo_id "/"->"_">` existing means "using existing"; else
  (or with `--force_download`) a download, which fails like the real offline one (it leaves the folder behind with
  only `.cache/` inside, last line `ValueError: Force download failed due to the above error.`, exit 1) unless
  TAGGER_DOUBLE_DOWNLOAD=1; then `import onnx` (`--onnx`) or `tensorflow` (not installed here) and
  `model.onnx` present, else `Exception: onnx model not found: ...`;
- pictures found like train_util.glob_images_pathlib (the listed extensions, case-sensitive, sorted);
  `found N images.`; tqdm on stderr drawn with `\\r`, counting batches; `--debug` records; `done!`;
- log records shaped like rich's (`YYYY-MM-DD HH:MM:SS INFO     message`) on stderr; stdout empty except
  `--frequency_tags`;
- a caption file `<stem><caption_extension>` per picture (UTF-8, tags joined by `--caption_separator`, `\\n`),
  written right after its batch (so a crash later leaves earlier ones), or `--output_path` JSON / JSON Lines;
- `--remove_underscore` for tags longer than 3 characters, `--undesired_tags`, `--always_first_tags`,
  `--append_tags`, thresholds compared with `>=`;
- the character-tag crash of FACTS.md 2.6 (`UnboundLocalError`, exit 1) when the "character" tag (knob below)
  reaches `--character_threshold`.

Tags are decided from each picture's mean colour, so tests know them in advance (score in brackets):
  `1girl` (0.95), `solo` (0.9), `<red|green|blue>_hair` by the strongest channel (0.8), `simple_background` (0.6),
  `smile` when the mean brightness is above 127 else `closed_mouth` (0.5), `looking_at_viewer` (0.3),
  and with TAGGER_DOUBLE_CHARACTER=1 the character tag `hatsune_miku` (0.9).
Tags are written in that (fixed, "CSV") order, as the real script keeps selected_tags.csv order.

Knobs (environment):
  TAGGER_DOUBLE_DOWNLOAD=1       a missing model is "downloaded" (model.onnx + selected_tags.csv written)
  TAGGER_DOUBLE_SLOW_S=<s>       sleep per batch (default 0)
  TAGGER_DOUBLE_CRASH_AT=<i>     raise PIL's UnidentifiedImageError on picture i (0-based), exit 1
  TAGGER_DOUBLE_CHARACTER=1      every picture gets the character tag (score 0.9)
  TAGGER_DOUBLE_SPAWN_CHILD=1    start a sleeping child (like DataLoader workers) and log `double child pid: N`
  TAGGER_DOUBLE_RECORD=<path>    write sys.argv[1:] as a JSON list before parsing anything
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_WD14_TAGGER_REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"]


def log(message: str, level: str = "INFO") -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} {level:<8} {message}", file=sys.stderr, flush=True)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("train_data_dir", type=str, help="directory for train images")
    parser.add_argument("--repo_id", type=str, default=DEFAULT_WD14_TAGGER_REPO, help="repo id for wd14 tagger")
    parser.add_argument("--model_dir", type=str, default="wd14_tagger_model", help="directory to store the model")
    parser.add_argument("--force_download", action="store_true", help="force downloading wd14 tagger models")
    parser.add_argument("--batch_size", type=int, default=1, help="batch size in inference")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None, help="DataLoader workers")
    parser.add_argument("--output_path", type=str, default=None, help="path for output captions (json format)")
    parser.add_argument("--caption_extention", type=str, default=None, help="(for backward compatibility)")
    parser.add_argument("--caption_extension", type=str, default=".txt", help="extension of caption file")
    parser.add_argument("--thresh", type=float, default=0.35, help="threshold of confidence to add a tag")
    parser.add_argument("--general_threshold", type=float, default=None, help="general category threshold")
    parser.add_argument("--character_threshold", type=float, default=None, help="character category threshold")
    parser.add_argument("--meta_threshold", type=float, default=None, help="meta category threshold")
    parser.add_argument("--model_threshold", type=float, default=None, help="model category threshold")
    parser.add_argument("--copyright_threshold", type=float, default=None, help="copyright category threshold")
    parser.add_argument("--artist_threshold", type=float, default=None, help="artist category threshold")
    parser.add_argument("--recursive", action="store_true", help="search for images in subfolders recursively")
    parser.add_argument("--remove_underscore", action="store_true", help="replace underscores with spaces")
    parser.add_argument("--debug", action="store_true", help="debug mode")
    parser.add_argument("--undesired_tags", type=str, default="", help="comma-separated undesired tags")
    parser.add_argument("--frequency_tags", action="store_true", help="Show frequency of tags for images")
    parser.add_argument("--onnx", action="store_true", help="use onnx model for inference")
    parser.add_argument("--append_tags", action="store_true", help="Append captions instead of overwriting")
    parser.add_argument("--use_rating_tags", action="store_true", help="Adds rating tags as the first tag")
    parser.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="rating tags as the last tag")
    parser.add_argument("--use_quality_tags", action="store_true", help="Adds quality tags as the first tag")
    parser.add_argument("--use_quality_tags_as_last_tag", action="store_true", help="quality tags as the last tag")
    parser.add_argument("--character_tags_first", action="store_true", help="character tags first")
    parser.add_argument("--always_first_tags", type=str, default=None, help="tags to always put at the beginning")
    parser.add_argument("--caption_separator", type=str, default=", ", help="Separator for captions")
    parser.add_argument("--tag_replacement", type=str, default=None, help="tag replacement (broken upstream)")
    parser.add_argument("--character_tag_expand", action="store_true", help="expand character tag parenthesis")
    return parser


def scores(path: Path) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(general, character) tags with their scores, from the picture's mean colour."""
    from PIL import Image  # the real script needs Pillow too; a picture it cannot open raises here as there

    with Image.open(path) as img:
        rgb = img.convert("RGB").resize((8, 8))
    pixels = list(rgb.getdata())
    mean = [sum(p[c] for p in pixels) / len(pixels) for c in range(3)]
    hair = ("red_hair", "green_hair", "blue_hair")[max(range(3), key=lambda c: mean[c])]
    mood = "smile" if sum(mean) / 3 > 127 else "closed_mouth"
    general = [("1girl", 0.95), ("solo", 0.9), (hair, 0.8), ("simple_background", 0.6), (mood, 0.5),
               ("looking_at_viewer", 0.3)]
    character = [("hatsune_miku", 0.9)] if os.environ.get("TAGGER_DOUBLE_CHARACTER") == "1" else []
    return general, character


def ensure_model(args: argparse.Namespace) -> None:
    location = os.path.join(args.model_dir, args.repo_id.replace("/", "_"))
    if not os.path.exists(location) or args.force_download:
        log(f"downloading wd14 tagger model from hf_hub. id: {args.repo_id}")
        # What hf_hub_download leaves behind before it fails (FACTS.md 3.4): the folder exists from now on.
        lock = Path(location) / ".cache" / "huggingface" / "download" / "selected_tags.csv.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
        if os.environ.get("TAGGER_DOUBLE_DOWNLOAD") != "1":
            raise ValueError("Force download failed due to the above error.")
        header = "tag_id,name,category,count\n"
        Path(location, "selected_tags.csv").write_text(header + "0,general,9,0\n", encoding="utf-8")
        Path(location, "model.onnx").write_bytes(b"\x08\x07double-onnx-model")
    else:
        log("using existing wd14 tagger model")
    if args.onnx:
        import onnx  # noqa: F401  (the real script imports it here, after the download step)
        import onnxruntime  # noqa: F401

        log("Running wd14 tagger with onnx")
        onnx_path = f"{location}/model.onnx"
        log(f"loading onnx model: {onnx_path}")
        if not os.path.exists(onnx_path):
            raise Exception(f"onnx model not found: {onnx_path}, please redownload the model with --force_download")
        log("Using onnxruntime providers: ['CPUExecutionProvider']")
    else:
        import tensorflow  # noqa: F401  (not installed: ModuleNotFoundError, as in the harness venv)


def find_images(folder: str, recursive: bool) -> list[Path]:
    root = Path(folder)
    found: set[Path] = set()
    for ext in IMAGE_EXTENSIONS:
        found.update(root.rglob("*" + ext) if recursive else root.glob("*" + ext))
    return sorted(found)


def split_tags(text: str | None, separator: str) -> list[str]:
    if not text:
        return []
    return [t.strip() for t in text.split(separator.strip()) if t.strip()]


def tags_for(path: Path, args: argparse.Namespace) -> list[str]:
    general, character = scores(path)
    tags = []
    for tag, score in general:
        if score >= args.general_threshold:
            tags.append(tag.replace("_", " ") if args.remove_underscore and len(tag) > 3 else tag)
    for _tag, score in character:
        if score >= args.character_threshold:
            # FACTS.md 2.6: the SmilingWolf branch reads a name run_batch made local (L375 / L407).
            raise UnboundLocalError(
                "cannot access local variable 'character_tags' where it is not associated with a value")
    undesired = set(split_tags(args.undesired_tags, args.caption_separator))
    tags = [t for t in tags if t not in undesired]
    for first in split_tags(args.always_first_tags, args.caption_separator):
        if first in tags:
            tags.remove(first)
            tags.insert(0, first)
    return tags


def draw_bar(done: int, total: int, started: float) -> None:
    frac = done / total if total else 1.0
    filled = int(frac * 10)
    bar = "█" * filled + " " * (10 - filled)
    elapsed = time.time() - started
    rate = f"{done / elapsed:.2f}it/s" if done and elapsed > 0 else "?it/s"
    sys.stderr.write(f"\r{int(frac * 100):3d}%|{bar}| {done}/{total} [00:00<00:00, {rate}]")
    sys.stderr.flush()


def main(args: argparse.Namespace) -> None:
    if os.environ.get("TAGGER_DOUBLE_SPAWN_CHILD") == "1":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        log(f"double child pid: {child.pid}")
    ensure_model(args)
    images = find_images(args.train_data_dir, args.recursive)
    log(f"found {len(images)} images.")
    slow = float(os.environ.get("TAGGER_DOUBLE_SLOW_S") or 0)
    crash_at = int(os.environ.get("TAGGER_DOUBLE_CRASH_AT") or -1)
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)] or [[]]
    started = time.time()
    draw_bar(0, len(batches), started)
    results: dict[str, dict[str, object]] = {}
    frequency: dict[str, int] = {}
    index = 0
    for n, batch in enumerate(batches, 1):
        time.sleep(slow)
        for path in batch:
            if index == crash_at:
                from PIL import UnidentifiedImageError

                raise UnidentifiedImageError(f"cannot identify image file '{path}'")
            index += 1
            tags = tags_for(path, args)
            caption_file = os.path.splitext(path)[0] + args.caption_extension
            if args.append_tags and os.path.exists(caption_file):
                with open(caption_file, encoding="utf-8") as fh:
                    existing = split_tags(fh.read().strip(), args.caption_separator)
                tags = existing + [t for t in tags if t not in existing]
            for tag in tags:
                frequency[tag] = frequency.get(tag, 0) + 1
            caption = args.caption_separator.join(tags)
            if args.debug:
                log("")
                log(f"{path}:")
                log(f"\tGeneral tags: {caption}")
            if args.output_path:
                from PIL import Image

                with Image.open(path) as img:
                    results[str(path)] = {"tags": caption, "image_size": list(img.size)}
            else:
                with open(caption_file, "w", encoding="utf-8") as fh:
                    fh.write(caption + "\n")
        draw_bar(n, len(batches), started)
    sys.stderr.write("\n")
    if args.output_path:
        if args.output_path.endswith(".jsonl"):
            with open(args.output_path, "w", encoding="utf-8") as fh:
                for path, item in results.items():
                    fh.write(json.dumps({"image_path": path, "caption": item["tags"],
                                         "image_size": item["image_size"]}) + "\n")
        else:
            with open(args.output_path, "w", encoding="utf-8") as fh:
                json.dump(results, fh, ensure_ascii=False, indent=4)
            log(f"captions saved to {args.output_path}")
    if args.frequency_tags:
        print("Tag frequencies:")
        for tag, count in sorted(frequency.items(), key=lambda x: x[1], reverse=True):
            print(f"{tag}: {count}")
    log("done!")


if __name__ == "__main__":
    record = os.environ.get("TAGGER_DOUBLE_RECORD")
    if record:
        Path(record).write_text(json.dumps(sys.argv[1:]), encoding="utf-8")
    parser = setup_parser()
    args = parser.parse_args()
    if args.caption_extention is not None:
        args.caption_extension = args.caption_extention
    for name in ("general", "character", "meta", "model", "copyright", "artist"):
        if getattr(args, f"{name}_threshold") is None:
            setattr(args, f"{name}_threshold", args.thresh)
    main(args)
