"""Everything around the 14 organs: body wall, chest, skeleton, psoas and bowel (none of it labelled)."""
from __future__ import annotations

import numpy as np

from .canvas import TissueCanvas
from .habitus import Habitus
from .shapes import ellipsoid
from .tissues import TISSUE_IDS, VISCERAL_FAT_ONLY, tissue_mask_lookup

_LUNG_OR_MEDIASTINUM = tissue_mask_lookup("lung", "mediastinal_fat")
_BOWEL_WALL = tissue_mask_lookup("bowel_wall")
_BOWEL_CONTENT = tissue_mask_lookup("bowel_content")
_WALL_TISSUES = tissue_mask_lookup("muscle", "subcutaneous_fat", "visceral_fat", "lung")
_BODY_LAYERS = np.array([TISSUE_IDS[n] for n in ("air", "skin", "subcutaneous_fat", "muscle", "visceral_fat")],
                        dtype=np.uint8)

# Ribs 12 (lowest) to 5: height above the lowest rib's head, angle (rad from the back) where bone ends,
# and where the costal cartilage that continues it ends (0 = floating rib, no cartilage).
_RIBS = [(0, 1.35, 0.0), (25, 1.75, 0.0), (50, 2.3, 2.75), (75, 2.45, 2.85), (100, 2.5, 2.95),
         (125, 2.55, 3.05), (150, 2.6, 3.1), (175, 2.6, 3.1)]
LOWEST_RIB_HEAD = 38.0
_RIB_DROP = 130.0   # mm a rib descends from its head to the front of the flank (over 2.2 rad)


def _slice_levels(canvas: TissueCanvas) -> np.ndarray:
    """(K, 1, 1) nominal S of each slice before deformation (the body outline changes slowly with level)."""
    z = canvas.grid.axis_coordinates()[2].astype(np.float64)
    return ((z - canvas.offset[2]) / canvas.scale[2]).reshape(-1, 1, 1)


def paint_body_wall(canvas: TissueCanvas, habitus: Habitus) -> None:
    """Air, skin, subcutaneous fat, muscle wall and the visceral fat filling the cavity, as nested ellipses.

    Each layer is an ellipse with its own anterior and posterior half-depth; the chest is a little narrower
    and the lower belly carries more anterior fat (a pannus).
    """
    z = _slice_levels(canvas)
    narrowing = 1.0 - 0.06 * np.clip((z - 60.0) / 120.0, 0.0, 1.0) + 0.05 * np.clip((-100.0 - z) / 100.0, 0.0, 1.0)
    pannus = habitus.fat[1] * 0.3 * np.clip(-z / 150.0, 0.0, 1.0)
    cavity = np.asarray(habitus.cavity, dtype=np.float64)
    muscle = cavity + np.asarray(habitus.wall)
    fat = muscle + np.asarray(habitus.fat)
    skin = fat + habitus.skin
    X2 = canvas.X * canvas.X
    Y2 = canvas.Y * canvas.Y
    anterior = canvas.Y > 0
    depth = np.zeros(canvas.tissue.shape, dtype=np.uint8)
    for (a, b_ant, b_post), extra in ((skin, pannus), (fat, pannus), (muscle, 0.0), (cavity, 0.0)):
        inv_a2 = (1.0 / (a * narrowing) ** 2).astype(np.float32)
        rho2 = np.where(anterior, (1.0 / ((b_ant + extra) * narrowing) ** 2).astype(np.float32),
                        (1.0 / (b_post * narrowing) ** 2).astype(np.float32))
        rho2 *= Y2
        rho2 += X2 * inv_a2
        depth += rho2 <= 1.0
    canvas.tissue[...] = _BODY_LAYERS[depth]


def paint_table(canvas: TissueCanvas, habitus: Habitus, rng: np.random.Generator) -> None:
    """The scanner couch under the patient's back: a gently curved foam core between two thin shells."""
    posterior_skin = -(habitus.cavity[2] + habitus.wall[2] + habitus.fat[2] + habitus.skin)
    top = posterior_skin - float(rng.uniform(0.0, 6.0))
    r = canvas.region((-250, top - 40, -1e5), (250, top, 1e5))
    if r is None:
        return
    surface = top + 0.0012 * r.X * r.X
    depth = surface - r.Y
    air = tissue_mask_lookup("air")
    inside = (depth >= 0) & (depth <= 14.0) & (np.abs(r.X) < 230.0)
    r.paint(inside, "table_shell", allowed=air)
    r.paint(inside & (depth >= 2.0) & (depth <= 12.0), "table_foam", allowed=tissue_mask_lookup("table_shell"))


def diaphragm_level(X, Y, habitus: Habitus) -> np.ndarray:
    """Nominal S of the diaphragm above (X, Y): two domes falling to deep posterior and lateral recesses."""
    dome = np.where(X > 0, np.float32(habitus.dome_right), np.float32(habitus.dome_left))
    dx = np.abs(X) - 62.0
    drop = 0.012 * dx * dx + np.where(Y < 0, np.float32(0.011), np.float32(0.004)) * Y * Y
    return dome - np.minimum(drop, 100.0)


def paint_chest(canvas: TissueCanvas, habitus: Habitus) -> None:
    """Lungs above the diaphragm, the mediastinum between them, the heart resting on the central tendon."""
    top_dome = max(habitus.dome_right, habitus.dome_left)
    r = canvas.region((-400, -400, min(habitus.dome_right, habitus.dome_left) - 100), (400, 400, 1e5))
    if r is None:
        return
    above = r.Z > diaphragm_level(r.X, r.Y, habitus)
    r.paint(above, "lung", allowed=VISCERAL_FAT_ONLY)
    mediastinum = ((r.X + 10.0) * (1 / 46.0)) ** 2 + ((r.Y - 5.0) * (1 / 72.0)) ** 2 <= 1.0
    r.paint(mediastinum & above, "mediastinal_fat", allowed=_LUNG_OR_MEDIASTINUM)
    heart = ellipsoid(r.X, r.Y, r.Z, (-18, 30, top_dome - 8), (62, 48, 52)) <= 1.0
    r.paint(heart & above, "heart", allowed=_LUNG_OR_MEDIASTINUM)
    sternum = ((r.X * (1 / 15.0)) ** 2 + ((r.Y - habitus.cavity[1] - 5.0) * (1 / 7.0)) ** 2 <= 1.0) \
        & (r.Z > top_dome - 45)
    r.paint(sternum, "rib")


def spine_level_y(Z) -> np.ndarray:
    """Nominal A of the vertebral body centre: the lumbar spine lies further forward than the thoracic."""
    return -40.0 - 10.0 * np.clip(Z * (1 / 150.0), 0.0, 1.0)


def paint_spine(canvas: TissueCanvas, rng: np.random.Generator) -> None:
    """Vertebral bodies (cortex, marrow) alternating with discs, the canal and the posterior arch."""
    r = canvas.region((-60, -150, -1e5), (60, 0, 1e5))
    if r is None:
        return
    X, Y, Z = r.X, r.Y, r.Z
    yv = spine_level_y(Z)
    lumbar = Z < 100.0
    rx = np.where(lumbar, np.float32(22.0), np.float32(17.0))
    q_body = (X / rx) ** 2 + ((Y - yv) * (1 / 16.0)) ** 2
    phase = np.mod((Z - float(rng.uniform(0, 32))) * (1 / 32.0), 1.0)
    disc = phase < 0.2
    body = q_body <= 1.0
    r.paint(body & disc, "intervertebral_disc")
    r.paint(body & ~disc, "cortical_bone")
    r.paint((q_body <= 0.7) & ~disc, "trabecular_bone")
    y_canal = yv - 26.0
    d2 = X * X + (Y - y_canal) ** 2
    arch_level = (phase > 0.15) & (phase < 0.8)
    r.paint((d2 <= 15.0 ** 2) & (Y < y_canal + 3.0) & arch_level, "cortical_bone")
    spinous = (np.abs(X) <= 4.5) & (Y < y_canal - 8.0) & (Y > y_canal - 44.0) & (phase > 0.25) & (phase < 0.85)
    r.paint(spinous, "cortical_bone")
    transverse = (np.abs(Y - y_canal - 4.0) <= 4.5) & (np.abs(X) > 10.0) & (np.abs(X) < 44.0) \
        & (phase > 0.35) & (phase < 0.6) & lumbar
    r.paint(transverse, "cortical_bone", allowed=_WALL_TISSUES | tissue_mask_lookup("psoas"))
    r.paint(d2 <= 8.5 ** 2, "spinal_canal")


def paint_ribs(canvas: TissueCanvas, habitus: Habitus) -> None:
    """Ribs 12..5 as bands sloping down from the back around the cavity edge, with costal cartilage in front."""
    a, b_ant, b_post = habitus.cavity
    r = canvas.region((-400, -400, LOWEST_RIB_HEAD - 45), (400, 400, 1e5))
    if r is None:
        return
    inv_b2 = np.where(r.Y > 0, np.float32(1 / b_ant ** 2), np.float32(1 / b_post ** 2))
    rho2 = r.X * r.X * (1 / a ** 2) + r.Y * r.Y * inv_b2
    ring = (rho2 >= 1.0) & (rho2 <= 1.11)
    idx = np.nonzero(ring)
    theta = np.arctan2(np.abs(r.X[idx]), -r.Y[idx])
    z = r.Z[idx]
    bone = np.zeros(theta.shape, dtype=bool)
    cartilage = np.zeros(theta.shape, dtype=bool)
    for height, bone_end, cartilage_end in _RIBS:
        z_head = LOWEST_RIB_HEAD + height
        z_rib = z_head - _RIB_DROP * np.clip(theta - 0.35, 0, None) * (1 / 2.2)
        band = np.abs(z - z_rib) < 4.0
        bone |= band & (theta > 0.35) & (theta < bone_end)
        if cartilage_end:
            z_end = z_head - _RIB_DROP * (bone_end - 0.35) / 2.2
            z_cart = z_end + 45.0 * (theta - bone_end)
            cartilage |= (np.abs(z - z_cart) < 4.0) & (theta >= bone_end) & (theta < cartilage_end)
    allowed = _WALL_TISSUES[r.tissue[idx]]
    values = r.tissue[idx]
    values[cartilage & allowed] = TISSUE_IDS["costal_cartilage"]
    values[bone & allowed] = TISSUE_IDS["rib"]
    r.tissue[idx] = values


def paint_psoas(canvas: TissueCanvas) -> None:
    """The psoas muscles beside the lumbar spine, thickening downwards."""
    for side in (1.0, -1.0):
        points = np.array([(24, -40, 50), (33, -38, 0), (44, -32, -80), (56, -22, -160), (68, -8, -240)], float)
        points[:, 0] *= side
        radii = (4.0, 12.0, 19.0, 23.0, 24.0)
        r = canvas.region_around(points, max(radii))
        if r is not None:
            r.paint(r.tube(points, radii) <= 1.0, "psoas", allowed=VISCERAL_FAT_ONLY)


def paint_bowel_loop(canvas: TissueCanvas, rng: np.random.Generator, points: np.ndarray, radii: np.ndarray,
                     gas_probability: float, bubbles: int = 0) -> None:
    """One unlabelled bowel segment: an enhancing wall, fluid or faecal content, an anterior gas layer, bubbles."""
    r = canvas.region_around(points, float(np.max(radii)))
    if r is None:
        return
    r.paint(r.tube(points, radii) <= 1.0, "bowel_wall", allowed=VISCERAL_FAT_ONLY)
    lumen = r.tube(points, np.maximum(radii - 3.0, 1.0)) <= 1.0
    r.paint(lumen, "bowel_content", allowed=_BOWEL_WALL)
    for n in range(len(points) - 1):      # gas collects anteriorly, segment by segment (supine patient)
        if rng.random() < gas_probability:
            level = float(np.mean(points[n:n + 2, 1]) + rng.uniform(-0.4, 0.8) * np.mean(radii[n:n + 2]))
            segment = r.tube(points[n:n + 2], np.maximum(radii[n:n + 2] - 3.0, 1.0)) <= 1.0
            r.paint(segment & (r.Y > level), "bowel_gas", allowed=_BOWEL_CONTENT)
    for _ in range(bubbles):
        seg = rng.integers(len(points) - 1)
        t = rng.random()
        centre = points[seg] + t * (points[seg + 1] - points[seg]) + rng.normal(0, 0.35 * radii[seg], 3)
        radius = rng.uniform(2.5, 7.0)
        rb = canvas.region_around(centre, radius)
        if rb is not None:
            rb.paint(ellipsoid(rb.X, rb.Y, rb.Z, centre, (radius,) * 3) <= 1.0, "bowel_gas", allowed=_BOWEL_CONTENT)


def paint_bowel(canvas: TissueCanvas, rng: np.random.Generator) -> None:
    """Colon framing the abdomen, jejunal loops to the left upper quadrant, ileal loops filling the lower belly."""
    colon = np.array([(95, 15, -230), (96, 14, -60), (90, 25, -8), (60, 62, 4), (20, 76, -12), (-20, 76, -12),
                      (-62, 60, 18), (-92, 28, 48), (-100, 4, 0), (-96, 0, -230)], float)
    colon += rng.normal(0, 5, colon.shape)
    paint_bowel_loop(canvas, rng, colon, rng.uniform(18, 25, len(colon)), gas_probability=0.6, bubbles=30)
    boxes = [((-85, 0, -30), (-35, 60, 20), 4), ((-70, -5, -240), (70, 75, -20), 16)]
    for low, high, count in boxes:
        for _ in range(count):
            start = rng.uniform(low, high)
            steps = rng.normal(0, 1, (4, 3)) * np.array([22.0, 18.0, 12.0])
            points = np.vstack([start, start + np.cumsum(steps, axis=0)])
            points = np.clip(points, np.asarray(low) - 10, np.asarray(high) + 10)
            paint_bowel_loop(canvas, rng, points, rng.uniform(9, 13, len(points)), gas_probability=0.35)
