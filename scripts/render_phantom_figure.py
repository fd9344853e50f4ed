#!/usr/bin/env python
"""Render Resources/Images/phantom_slices.png: axial phantom slices, abdomen window, with label overlays.

Usage: python scripts/render_phantom_figure.py [--seeds 3 7] [--out Resources/Images/phantom_slices.png]

Each phantom gets two rows: the CT (W400/L40) and the same slices with the 14 organ labels in their
organs.py colours. Slices are chosen at the peak of a few organs, so levels from the diaphragm to the
kidneys are shown. Drawn with Pillow only (matplotlib is not a dependency).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from CTReasonerLib.data.phantom import generate_phantom
from CTReasonerLib.io.windowing import apply_window
from CTReasonerLib.organs import ORGANS, get_organ

# The organ whose largest cross-section picks each column's slice (top of the abdomen to the bottom).
LEVEL_ORGANS = ("esophagus", "left_adrenal_gland", "pancreas", "gallbladder", "right_kidney")
PANEL = 300
OVERLAY_ALPHA = 0.45


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:     # Pillow without FreeType sizes
        return ImageFont.load_default()


def _slice_index(labels: np.ndarray, organ_key: str) -> int:
    area = (labels == get_organ(organ_key).label).sum(axis=(1, 2))
    if organ_key == "esophagus":    # lowest slice where it is still a tube above the stomach, not its top
        present = np.nonzero(area)[0]
        return int(present[len(present) // 4]) if len(present) else labels.shape[0] - 1
    return int(np.argmax(area))


def _panels(ct, labels, k: int):
    gray = (apply_window(ct[k], "abdomen") * 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    colours = np.zeros((256, 3), dtype=np.float32)
    for organ in ORGANS:
        colours[organ.label] = organ.color
    lab = labels[k]
    mask = lab > 0
    rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colours[lab[mask]]
    size = (PANEL, PANEL)
    return (Image.fromarray(gray).convert("RGB").resize(size, Image.BILINEAR),
            Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.NEAREST))


def render(seeds, out: Path) -> Path:
    columns = len(LEVEL_ORGANS)
    legend_h = 120
    header = 26
    figure = Image.new("RGB", (columns * PANEL, len(seeds) * (2 * PANEL + header) + legend_h), "black")
    draw = ImageDraw.Draw(figure)
    font, small = _font(16), _font(14)
    y = 0
    for seed in seeds:
        ct, labels = generate_phantom(seed)
        s = ct.spacing
        draw.text((6, y + 4), f"seed {seed}: {ct.metadata['contrast_phase'].replace('_', ' ')} phase, "
                  f"{ct.array.shape[2]}x{ct.array.shape[1]}x{ct.array.shape[0]} voxels, "
                  f"{s[0]:.2f} x {s[1]:.2f} x {s[2]:.2f} mm, abdomen window W400/L40 "
                  f"(image left = patient right, top = anterior)", fill="white", font=font)
        y += header
        for c, organ_key in enumerate(LEVEL_ORGANS):
            k = _slice_index(labels.array, organ_key)
            plain, overlay = _panels(ct.array, labels.array, k)
            figure.paste(plain, (c * PANEL, y))
            figure.paste(overlay, (c * PANEL, y + PANEL))
            s_mm = ct.origin[2] + k * ct.spacing[2]
            draw.text((c * PANEL + 6, y + 6), f"k={k}  S={s_mm:.0f} mm", fill="yellow", font=small)
        y += 2 * PANEL
    per_row = 5
    for n, organ in enumerate(ORGANS):
        x0 = (n % per_row) * (columns * PANEL // per_row) + 10
        y0 = y + 10 + (n // per_row) * 34
        draw.rectangle([x0, y0, x0 + 22, y0 + 22], fill=tuple(organ.color))
        draw.text((x0 + 30, y0 + 3), f"{organ.label} {organ.name}", fill="white", font=small)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 7])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "Resources" / "Images"
                        / "phantom_slices.png")
    args = parser.parse_args()
    print(f"wrote {render(args.seeds, args.out)}")


if __name__ == "__main__":
    main()
