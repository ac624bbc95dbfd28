"""Image token counts and pixel values from the Hugging Face Qwen2-VL image processor.

Run in .venv-ref (`bash tools/reference/setup.sh`): transformers' own processor
(`Qwen2VLImageProcessorPil`, the PIL backend: PIL bicubic resampling) with the Qwen3.5/3.6
settings (patch 16, temporal patch 2, merge 2, min 65,536 / max 16,777,216 pixels, mean = std
= 0.5). Writes the committed fixtures the Rust tests compare against:

- runtime/tests/fixtures/image_tokens.json: per image size, the resized size, grid_thw and
  token count, or the processor's error;
- runtime/tests/fixtures/image_tokens_pixels/: small deterministic input images, and the
  processor's pixel_values stored as 8-bit levels k (value = (k/255 - mean)/std, checked exact
  here) in a grayscale PNG of rows x 1536, plus manifest.json.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import transformers
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "runtime/tests/fixtures"
CONFIG = dict(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=65_536, max_pixels=16_777_216)


def processor(min_pixels, max_pixels):
    return Qwen2VLImageProcessorPil(
        patch_size=CONFIG["patch_size"],
        temporal_patch_size=CONFIG["temporal_patch_size"],
        merge_size=CONFIG["merge_size"],
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


# (width, height)
SIZES = [
    (1, 1), (2, 2), (9, 9), (10, 10), (1, 3), (3, 1), (31, 33), (32, 32), (48, 80), (80, 48),
    (112, 112), (224, 224), (255, 257), (400, 208), (208, 400), (720, 1168), (1168, 720),
    (640, 480), (480, 640), (800, 600), (1024, 1024), (1280, 720), (1920, 1080), (1080, 1920),
    (2048, 1536), (3840, 2160), (4032, 3024), (3024, 4032), (4096, 4096), (4097, 4097),
    (5000, 5000), (8192, 8192), (200, 1), (1, 200), (201, 1), (1, 4000), (4000, 1),
    (10000, 50), (10001, 50), (50, 10001), (17, 3400), (1000, 7), (7, 1399),
]
# Above this many pixels the table uses the processor's smart_resize and size helper instead
# of running it on an image (same code path for the size; keeps the script quick).
RUN_FULL_UP_TO = 13_000_000


def token_rows():
    proc = processor(CONFIG["min_pixels"], CONFIG["max_pixels"])
    factor = CONFIG["patch_size"] * CONFIG["merge_size"]
    rows = []
    for width, height in SIZES:
        row = {"width": width, "height": height}
        try:
            rh, rw = smart_resize(height, width, factor, CONFIG["min_pixels"], CONFIG["max_pixels"])
            patches = proc.get_number_of_image_patches(height, width)
            grid = [1, rh // CONFIG["patch_size"], rw // CONFIG["patch_size"]]
            assert patches == grid[1] * grid[2]
            if width * height <= RUN_FULL_UP_TO:
                out = proc(images=Image.new("RGB", (width, height), (120, 60, 30)))
                assert out["image_grid_thw"].tolist() == [grid], (width, height)
                assert out["pixel_values"].shape == (patches, 1536)
                row["ran_processor"] = True
            else:
                row["ran_processor"] = False
            row.update(resized_height=rh, resized_width=rw, grid_thw=grid, tokens=patches // 4)
        except ValueError as e:
            row["error"] = str(e)
        rows.append(row)
    return rows


def pixel_images():
    rng = np.random.default_rng(20261126)
    y, x = np.mgrid[0:23, 0:37]
    grad = np.stack([x * 255 // 36, y * 255 // 22, (x * y) % 256], -1).astype(np.uint8)
    grad[5:12, 10:20] = rng.integers(0, 256, (7, 10, 3), dtype=np.uint8)
    grad[::4, :, 2] = 255
    yield "gradient_rgb_37x23", Image.fromarray(grad, "RGB"), CONFIG["min_pixels"], CONFIG["max_pixels"]

    y, x = np.mgrid[0:41, 0:50]
    rgba = np.stack([x * 5, 255 - y * 6, (x + y) * 3 % 256, (x * 7 + y * 3) % 256], -1).astype(np.uint8)
    rgba[:, :6, 3] = 0
    rgba[:, 44:, 3] = 255
    yield "alpha_rgba_50x41", Image.fromarray(rgba, "RGBA"), CONFIG["min_pixels"], CONFIG["max_pixels"]

    noise = rng.integers(0, 256, (100, 160, 3), dtype=np.uint8)
    noise[:, 80:] = noise[:, 80:] // 64 * 64
    yield "noise_rgb_160x100_shrunk", Image.fromarray(noise, "RGB"), 1024, 8192

    y, x = np.mgrid[0:48, 0:64]
    photo = np.stack([128 + 100 * np.sin(x / 5.0), 128 + 90 * np.cos(y / 7.0), (x * y) % 200], -1)
    photo[20:30, 20:44] = [250, 30, 30]
    yield "photo_jpeg_64x48", Image.fromarray(photo.astype(np.uint8), "RGB"), CONFIG["min_pixels"], CONFIG["max_pixels"]

    gray = (np.add.outer(np.arange(20) * 13, np.arange(20) * 7) % 256).astype(np.uint8)
    yield "gray_l_20x20", Image.fromarray(gray, "L"), CONFIG["min_pixels"], CONFIG["max_pixels"]


def write_pixels():
    out_dir = FIXTURES / "image_tokens_pixels"
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name, image, min_pixels, max_pixels in pixel_images():
        ext = "jpg" if "jpeg" in name else "png"
        path = out_dir / f"{name}.{ext}"
        if ext == "jpg":
            image.save(path, quality=90, subsampling="4:2:0")
        else:
            image.save(path, optimize=True)
        # Process the file as a user would send it: decoded again from PNG.
        out = processor(min_pixels, max_pixels)(images=Image.open(path))
        values = out["pixel_values"]
        levels = np.rint((values.astype(np.float64) * 0.5 + 0.5) * 255).astype(np.int64)
        assert levels.min() >= 0 and levels.max() <= 255
        k = levels.astype(np.uint8)
        back = ((k.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
        assert np.array_equal(back, values.astype(np.float32)), name
        Image.fromarray(k, "L").save(out_dir / f"{name}.hf.png", optimize=True)
        manifest.append(
            {
                "image": path.name,
                "levels": f"{name}.hf.png",
                "min_pixels": min_pixels,
                "max_pixels": max_pixels,
                "grid_thw": out["image_grid_thw"][0].tolist(),
                "rows": int(values.shape[0]),
            }
        )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def main():
    rows = token_rows()
    table = {
        "source": f"transformers {transformers.__version__} Qwen2VLImageProcessorPil (tools/reference/image_tokens.py)",
        "config": CONFIG,
        "rows": rows,
    }
    lines = ",\n".join("  " + json.dumps(r) for r in rows)
    (FIXTURES / "image_tokens.json").write_text(
        f'{{"source": {json.dumps(table["source"])},\n "config": {json.dumps(CONFIG)},\n "rows": [\n{lines}\n]}}\n'
    )
    write_pixels()
    print(f"{len(rows)} sizes, {sum('error' in r for r in rows)} refused", file=sys.stderr)


if __name__ == "__main__":
    main()
