"""Picture of every attack's trigger on a few real CIFAR-10 test images.

    python experiments/trigger_pictures.py [--shared ../shared] [--out docs/img/triggers.png]

Rows: the clean images, then each attack of ``ibau_jax.attacks.ATTACK_NAMES`` (target 0,
seed 0, default settings; WaNet shows its fixed warp). The last column is the change
|x' - x| of the first image, scaled so its largest value is white (subtle triggers such as
SIG and WaNet are hard to see otherwise). Every pixel is upscaled x4 (nearest neighbour).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ibau_jax import attacks

REPO = Path(__file__).resolve().parents[1]
SCALE = 4
PAD = 4
LABEL_W = 130


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--out", default=str(REPO / "docs" / "img" / "triggers.png"))
    ap.add_argument("--images", type=int, nargs="+", default=[0, 1, 3, 4, 6, 11],
                    help="test-set indices to show")
    args = ap.parse_args()

    shared = Path(args.shared)
    with np.load(shared / "datasets" / "cifar10" / "test.npz", allow_pickle=False) as f:
        x = f["x"][args.images].astype(np.float32) / 255.0
        y = f["y"][args.images].astype(np.int64)
    trig_dir = shared / "ibau-original" / "triggers"

    rows: list[tuple[str, np.ndarray]] = [("clean", x)]
    for name in attacks.ATTACK_NAMES:
        a = attacks.make_attack(name, num_classes=10, target=0, trigger_dir=trig_dir, seed=0)
        xt, _, _ = attacks.asr_test_set(x, y, a)
        rows.append((name, xt))

    n = len(args.images)
    cell = 32 * SCALE
    width = LABEL_W + (n + 1) * (cell + PAD) + PAD
    height = 20 + len(rows) * (cell + PAD) + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c in range(n):
        draw.text((LABEL_W + c * (cell + PAD) + PAD, 4), f"test #{args.images[c]}", fill=(0, 0, 0))
    draw.text((LABEL_W + n * (cell + PAD) + PAD, 4), "|x'-x| (#%d)" % args.images[0], fill=(0, 0, 0))

    def paste(img: np.ndarray, r: int, c: int) -> None:
        arr = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
        im = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
        canvas.paste(im, (LABEL_W + c * (cell + PAD) + PAD, 20 + r * (cell + PAD) + PAD))

    for r, (name, imgs) in enumerate(rows):
        draw.text((6, 20 + r * (cell + PAD) + PAD + cell // 2 - 6), name, fill=(0, 0, 0))
        for c in range(n):
            paste(imgs[c], r, c)
        diff = np.abs(imgs[0] - x[0])
        if diff.max() > 0:
            diff = diff / diff.max()
        paste(diff, r, n)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    print(f"wrote {out} ({width}x{height})")


if __name__ == "__main__":
    main()
