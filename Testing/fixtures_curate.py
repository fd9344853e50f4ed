"""Hand-made abdominal (CT, label map) pairs for the curation tests: ellipsoid organs at known places.

The grid is LPS-acquired like most CT: column index i runs toward the patient's LEFT and row index j
toward POSTERIOR, so ``directions = diag(-1, -1, 1)``; the liver sits at low columns (patient right).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from CTReasonerLib.io.volume import Volume
from CTReasonerLib.organs import get_organ

# organ key -> (centre (k, j, i) as fractions of the grid, semi-axes (k, j, i) as fractions, HU)
ORGAN_LAYOUT: Dict[str, Tuple[Tuple[float, float, float], Tuple[float, float, float], float]] = {
    "liver": ((0.55, 0.45, 0.30), (0.35, 0.20, 0.16), 100.0),
    "spleen": ((0.60, 0.55, 0.76), (0.20, 0.10, 0.07), 115.0),
    "right_kidney": ((0.35, 0.66, 0.34), (0.22, 0.07, 0.05), 160.0),
    "left_kidney": ((0.37, 0.66, 0.66), (0.22, 0.07, 0.05), 160.0),
    "gallbladder": ((0.35, 0.38, 0.36), (0.12, 0.04, 0.03), 10.0),
    "esophagus": ((0.88, 0.60, 0.52), (0.15, 0.02, 0.02), 40.0),
    "stomach": ((0.65, 0.38, 0.63), (0.20, 0.10, 0.09), 30.0),
    "aorta": ((0.50, 0.62, 0.52), (0.50, 0.025, 0.025), 190.0),
    "inferior_vena_cava": ((0.50, 0.60, 0.44), (0.45, 0.025, 0.03), 140.0),
    "portal_splenic_veins": ((0.55, 0.52, 0.50), (0.08, 0.02, 0.08), 170.0),
    "pancreas": ((0.45, 0.53, 0.55), (0.08, 0.03, 0.12), 90.0),
    "right_adrenal_gland": ((0.62, 0.63, 0.40), (0.08, 0.015, 0.015), 60.0),
    "left_adrenal_gland": ((0.62, 0.63, 0.60), (0.08, 0.015, 0.015), 60.0),
    "duodenum": ((0.35, 0.50, 0.42), (0.10, 0.04, 0.05), 45.0),
}
LPS_DIRECTIONS = np.diag([-1.0, -1.0, 1.0])


def make_synthetic_pair(shape=(40, 96, 96), spacing=(1.5, 1.5, 4.0), seed: int = 0,
                        directions=LPS_DIRECTIONS) -> Tuple[Volume, np.ndarray]:
    """(CT volume, labels (K, J, I) uint8 with organs.py values) of a crude ellipsoid abdomen."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    ct = np.full(shape, -1000.0)
    body = ((j - 0.5) / 0.42) ** 2 + ((i - 0.5) / 0.46) ** 2 <= 1.0
    ct[body] = -90.0
    labels = np.zeros(shape, dtype=np.uint8)
    for key, (centre, axes, hu) in ORGAN_LAYOUT.items():
        jitter = rng.normal(0, 0.01, 3)
        inside = sum(((grid - c - d) / a) ** 2 for grid, c, a, d in zip((k, j, i), centre, axes, jitter)) <= 1.0
        labels[inside & body] = get_organ(key).label
        ct[inside & body] = hu
    ct += rng.normal(0, 6.0, shape) * body
    origin = np.array([spacing[0] * shape[2] / 2, spacing[1] * shape[1] / 2, 0.0])
    return Volume(array=ct.astype(np.float32), spacing=spacing, origin=origin, directions=directions,
                  name=f"synthetic{seed}"), labels
