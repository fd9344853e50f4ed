"""The 14 labelled organs and the unlabelled vessels between them, painted in priority order.

Positions are nominal mm (see habitus.py). The order of the calls in ``paint_viscera`` is the overlap
priority: later structures win where shapes meet, so vessels cut through parenchyma, the gallbladder and
kidneys dent the liver, and the spleen and liver mould the stomach.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from .canvas import TissueCanvas
from .habitus import Habitus
from .shapes import ellipsoid, rotation, taper
from .tissues import ABDOMINAL_SPACE, OUTSIDE_ORGANS, THORACIC_SPACE, TISSUE_IDS, tissue_mask_lookup

_LIVER = tissue_mask_lookup("liver")
_ORGAN_TISSUE = {"right": ("right_kidney_cortex", "right_kidney_medulla", "right_adrenal_gland"),
                 "left": ("left_kidney_cortex", "left_kidney_medulla", "left_adrenal_gland")}


class _Sampler:
    """Per-organ random offsets and size factors drawn from the phantom's generator."""

    def __init__(self, rng: np.random.Generator, size_jitter: float):
        self.rng = rng
        self.size_jitter = size_jitter

    def shift(self, sd: float = 4.0) -> np.ndarray:
        return self.rng.normal(0.0, sd, 3)

    def size(self, low: float = None, high: float = None) -> float:
        if low is None:
            low, high = 1.0 - 1.5 * self.size_jitter, 1.0 + 1.5 * self.size_jitter
        return float(self.rng.uniform(low, high))


def _paint_tube(canvas: TissueCanvas, points, radii, tissue: str, allowed, metric=(1.0, 1.0, 1.0)) -> None:
    points = np.asarray(points, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64)
    r = canvas.region_around(points, float(radii.max()) / min(1.0, min(metric)) ** 0.5)
    if r is not None:
        r.paint(r.tube(points, radii, metric) <= 1.0, tissue, allowed=allowed)


def _paint_hollow(canvas: TissueCanvas, rng: np.random.Generator, points, radii, wall: float,
                  names: Tuple[str, str, str], gas_probability: float) -> None:
    """A hollow organ: wall, content, and (supine patient) gas floating anteriorly in the lumen."""
    points = np.asarray(points, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64)
    r = canvas.region_around(points, float(radii.max()))
    if r is None:
        return
    wall_name, content_name, gas_name = names
    r.paint(r.tube(points, radii) <= 1.0, wall_name, allowed=ABDOMINAL_SPACE)
    lumen = r.tube(points, np.maximum(radii - wall, 1.5)) <= 1.0
    lumen &= r.tissue == TISSUE_IDS[wall_name]
    r.tissue[lumen] = TISSUE_IDS[content_name]
    if rng.random() < gas_probability:
        level = float(np.max(points[:, 1] + radii) - rng.uniform(0.15, 0.6) * np.mean(radii))
        r.tissue[lumen & (r.Y > level)] = TISSUE_IDS[gas_name]


def paint_esophagus(canvas: TissueCanvas, s: _Sampler) -> None:
    """From above, behind the heart and right of the aorta, through the hiatus into the cardia."""
    points = np.array([(2, -16, 600), (0, -14, 170), (-5, -4, 140), (-20, -2, 122), (-35, 4, 112), (-45, 6, 106)])
    points = points + s.shift(2.5)
    _paint_tube(canvas, points, 9.0 * s.size(0.9, 1.15) * np.array([1, 1, 1, 1.05, 1.1, 1.1]), "esophagus",
                THORACIC_SPACE)


def paint_stomach(canvas: TissueCanvas, s: _Sampler) -> None:
    """Fundus under the left dome, body along the left flank, antrum crossing to the pylorus."""
    points = np.array([(-52, -2, 125), (-62, 10, 98), (-60, 28, 70), (-42, 48, 48), (-12, 56, 38), (10, 46, 34)])
    points = points + s.shift(4.0)
    distension = s.size(0.8, 1.2)
    radii = np.array([36, 40, 36, 28, 19, 11]) * distension
    _paint_hollow(canvas, s.rng, points, radii, 4.0, ("stomach_wall", "stomach_content", "stomach_gas"), 0.8)


def paint_liver(canvas: TissueCanvas, s: _Sampler) -> None:
    """Right lobe filling the right upper quadrant (cut obliquely on its medial side), left lobe across the
    midline in front of the stomach, caudate lobe beside the IVC, and the hepatic veins draining upwards."""
    shift, size = s.shift(4.0), s.size(0.9, 1.15)
    centre = np.array([62, 4, 62]) + shift
    radii = np.array([84, 94, 92]) * size
    r = canvas.region(centre - radii, centre + radii)
    if r is not None:
        q = ellipsoid(r.X, r.Y, r.Z, centre, radii, rotation(y_deg=-12))
        medial_cut = r.X > (30.0 + float(shift[0])) + 1.1 * (10.0 + float(shift[2]) - r.Z) - 0.45 * r.Y
        r.paint((q <= 1.0) & medial_cut, "liver", allowed=ABDOMINAL_SPACE)
    left = np.array([-10, 48, 96]) + shift + s.shift(3.0)
    left_radii = np.array([62, 34, 38]) * size * s.size()
    r = canvas.region(left - left_radii, left + left_radii)
    if r is not None:
        r.paint(ellipsoid(r.X, r.Y, r.Z, left, left_radii, rotation(z_deg=-10)) <= 1.0, "liver",
                allowed=ABDOMINAL_SPACE)
    caudate = np.array([18, -16, 78]) + shift
    r = canvas.region(caudate - 30, caudate + 30)
    if r is not None:
        r.paint(ellipsoid(r.X, r.Y, r.Z, caudate, (16, 16, 28)) <= 1.0, "liver", allowed=ABDOMINAL_SPACE)
    confluence = np.array([20, -8, 128]) + shift
    for end in ((95, -25, 95), (45, 45, 88), (-25, 42, 112)):
        _paint_tube(canvas, [confluence, np.asarray(end) + shift], (5.5, 2.0), "hepatic_vein", _LIVER)


def paint_spleen(canvas: TissueCanvas, s: _Sampler, habitus: Habitus) -> None:
    """A crescent against the left posterolateral wall, its concave hilum facing the stomach and pancreas."""
    centre = np.array([-98, -40, 80]) + s.shift(4.0)
    size = s.size(0.8, 1.3)
    normal = np.array([centre[0] / habitus.cavity[0] ** 2, centre[1] / habitus.cavity[2] ** 2, 0.0])
    normal /= np.linalg.norm(normal)
    axes = np.array([normal, (-normal[1], normal[0], 0.0), (0.0, 0.0, 1.0)])
    radii = np.array([24, 58, 50]) * size
    r = canvas.region(centre - radii.max(), centre + radii.max())
    if r is not None:
        body = ellipsoid(r.X, r.Y, r.Z, centre, radii, axes) <= 1.0
        hilum = ellipsoid(r.X, r.Y, r.Z, centre - normal * 34 * size, np.array([26, 30, 34]) * size, axes) <= 1.0
        r.paint(body & ~hilum, "spleen", allowed=ABDOMINAL_SPACE)


def paint_kidneys(canvas: TissueCanvas, s: _Sampler) -> Dict[str, np.ndarray]:
    """Bean-shaped kidneys beside the spine, hilum facing anteromedially, upper poles tilted in.

    Returns each kidney's upper-pole position (nominal mm), which places the adrenal glands.
    """
    upper_poles = {}
    for side, sign, centre in (("right", 1.0, (66, -46, -26)), ("left", -1.0, (-64, -42, -8))):
        cortex, medulla, _ = _ORGAN_TISSUE[side]
        centre = np.array(centre) + s.shift(3.0) * np.array([1, 1, 1.8])
        radii = np.array([27, 22, 52]) * s.size()
        axes = rotation(z_deg=150.0 if sign > 0 else 30.0, y_deg=12.0)
        r = canvas.region(centre - radii.max(), centre + radii.max())
        upper_poles[side] = centre + axes[2] * radii[2]
        if r is None:
            continue
        q = ellipsoid(r.X, r.Y, r.Z, centre, radii, axes)
        hilum_centre = centre + axes[0] * 15.0
        sinus = ellipsoid(r.X, r.Y, r.Z, hilum_centre, (12, 9, 24), axes) <= 1.0
        r.paint(q <= 1.0, cortex, allowed=ABDOMINAL_SPACE)
        r.paint((q <= 0.45) & ~sinus, medulla, allowed=ABDOMINAL_SPACE)
        r.paint(sinus & (q <= 1.3), "renal_sinus_fat", allowed=ABDOMINAL_SPACE)
    return upper_poles


def paint_gallbladder(canvas: TissueCanvas, s: _Sampler) -> None:
    """A pear under the liver's inferior surface, fundus pointing anteroinferiorly."""
    centre = np.array([56, 50, 2]) + s.shift(4.0)
    radii = np.array([15, 18, 34]) * s.size(0.7, 1.25)
    r = canvas.region(centre - radii.max(), centre + radii.max())
    if r is not None:
        r.paint(ellipsoid(r.X, r.Y, r.Z, centre, radii, rotation(x_deg=35)) <= 1.0, "gallbladder_bile",
                allowed=ABDOMINAL_SPACE)


def paint_pancreas(canvas: TissueCanvas, shift: np.ndarray, s: _Sampler) -> None:
    """Uncinate and head in the duodenal C, neck over the portal confluence, body across the aorta, tail to
    the splenic hilum; taller than thick, as in reality."""
    points = np.array([(22, 8, -8), (26, 16, 8), (12, 28, 22), (-18, 22, 30), (-48, 6, 37), (-76, -16, 46)]) + shift
    radii = np.array([10, 16, 10, 12, 11, 9.5]) * s.size(0.85, 1.15)
    _paint_tube(canvas, points, radii, "pancreas", ABDOMINAL_SPACE, metric=(1.0, 1.0, 0.55))


def paint_duodenum(canvas: TissueCanvas, shift: np.ndarray, s: _Sampler) -> None:
    """The C-loop from the pylorus around the pancreatic head, under the SMA, up to the DJ flexure."""
    points = np.array([(10, 46, 34), (30, 40, 38), (46, 26, 34), (54, 12, 20), (56, 8, 0), (50, 8, -18),
                       (30, 17, -28), (5, 19, -32), (-20, 19, -28), (-32, 20, -14), (-36, 24, 0), (-40, 28, 8)])
    points = points + shift + s.rng.normal(0, 1.5, (len(points), 3))
    radii = np.array([12, 12, 12, 12, 12, 12, 11, 11, 11, 11, 11, 10]) * s.size(0.85, 1.15)
    _paint_hollow(canvas, s.rng, points, radii, 3.0, ("duodenum_wall", "duodenum_content", "duodenum_gas"), 0.5)


def paint_adrenals(canvas: TissueCanvas, upper_poles: Dict[str, np.ndarray], s: _Sampler) -> None:
    """Thin inverted-Y (right) and lambda (left) glands, supero-medial to the kidneys' upper poles."""
    shapes = {
        "right": ([(36, -22), (34, -30), (28, -52)], [(34, -30), (50, -46)], (3.0, 38.0)),
        "left": ([(-30, -16), (-34, -26), (-30, -48)], [(-34, -26), (-46, -40)], (-10.0, 24.0)),
    }
    for side, (medial_limb, lateral_limb, (z_low, z_high)) in shapes.items():
        pole = upper_poles[side]
        offset = np.append(s.shift(2.0)[:2], 0.0)
        limbs = [np.array([(x, y, 0.0) for x, y in limb]) + offset for limb in (medial_limb, lateral_limb)]
        z0, z1 = pole[2] + z_low, pole[2] + z_high
        thickness = 3.6 * s.size(0.9, 1.15)
        allpts = np.vstack(limbs)
        r = canvas.region((*allpts[:, :2].min(axis=0) - 6, z0), (*allpts[:, :2].max(axis=0) + 6, z1))
        if r is None:
            continue
        q = np.minimum(*(r.tube(limb, np.linspace(thickness, 0.8 * thickness, len(limb)), (1.0, 1.0, 0.0))
                         for limb in limbs))
        profile = taper(r.Z, z0, z1)
        r.paint(q <= profile * profile, _ORGAN_TISSUE[side][2], allowed=ABDOMINAL_SPACE)


def paint_portal_splenic_veins(canvas: TissueCanvas, shift: np.ndarray) -> None:
    """Splenic vein along the back of the pancreas to the confluence, portal vein up to the liver hilum, and
    the (unlabelled) superior mesenteric vein joining from below."""
    confluence = (6, 14, 24)
    _paint_tube(canvas, np.array([confluence, (-18, 6, 30), (-44, -6, 36), (-68, -20, 44), (-86, -30, 54)]) + shift,
                (5.0, 4.8, 4.5, 4.5, 4.2), "portal_splenic_veins", ABDOMINAL_SPACE)
    _paint_tube(canvas, np.array([confluence, (20, 12, 38), (40, 10, 52), (58, 4, 60)]) + shift,
                (7.0, 7.0, 6.5, 5.0), "portal_splenic_veins", ABDOMINAL_SPACE)
    _paint_tube(canvas, np.array([(40, 10, 52), (25, 28, 68), (5, 40, 78)]) + shift, (4.5, 4.0, 3.0),
                "portal_splenic_veins", ABDOMINAL_SPACE)
    _paint_tube(canvas, np.array([(8, 40, -90), (8, 30, -10), (7, 18, 18), confluence]) + shift,
                (5.5, 5.5, 5.5, 5.0), "mesenteric_vein", ABDOMINAL_SPACE)


def paint_great_vessels(canvas: TissueCanvas, shift: np.ndarray) -> None:
    """IVC right of the aorta (through the liver to the heart), renal veins, aorta with its branches."""
    _paint_tube(canvas, np.array([(22, -8, -110), (22, -7, 0), (24, -8, 45), (24, -14, 90), (18, -6, 130),
                                  (14, 8, 160)]) + shift * 0.3,
                (11, 12, 13, 13, 14, 15), "inferior_vena_cava", THORACIC_SPACE, metric=(1.0, 1.4, 1.0))
    for side in (1.0, -1.0):
        _paint_tube(canvas, [(22, -8, -110), (side * 45 + 10, -10, -170), (side * 68, -11, -240)], (10, 10, 10),
                    "systemic_vein", OUTSIDE_ORGANS)
    _paint_tube(canvas, [(46, -36, -18), (24, -10, -12)], (5.5, 5.5), "systemic_vein", OUTSIDE_ORGANS)
    _paint_tube(canvas, [(-44, -30, -4), (-26, 2, -6), (-10, 12, -8), (16, 2, -8), (22, -7, -8)], (5, 5, 5, 5, 5.5),
                "systemic_vein", OUTSIDE_ORGANS)
    _paint_tube(canvas, [(-26, -24, 600), (-26, -24, 160), (-20, -14, 110), (-14, -6, 40), (-12, -4, -40),
                         (-8, -2, -105)], (12.5, 12.5, 12, 11.5, 11, 10), "aorta", THORACIC_SPACE)
    for side in (1.0, -1.0):
        _paint_tube(canvas, [(-8, -2, -105), (side * 40 - 5, 2, -170), (side * 62, 0, -240)], (7, 7, 6.5),
                    "artery", OUTSIDE_ORGANS | tissue_mask_lookup("systemic_vein"))
    branches = [([(-13, -6, 4), (20, -18, 0), (44, -38, -14)], 3.5),          # right renal artery, behind the IVC
                ([(-13, -6, 4), (-44, -34, -2)], 3.5),                          # left renal artery
                ([(-14, 4, 52), (-12, 22, 56), (10, 24, 56), (35, 20, 55)], 3.2),  # coeliac trunk, hepatic artery
                ([(-12, 22, 56), (-35, 12, 54), (-60, -5, 58), (-85, -22, 62)], 3.0)]  # splenic artery
    for points, radius in branches:
        _paint_tube(canvas, points, (radius,) * len(points), "artery", OUTSIDE_ORGANS)
    sma = np.array([(-14, 6, 38), (-12, 20, 26), (-9, 32, 0), (-4, 40, -90)]) + shift * np.array([0.5, 1, 0.5])
    _paint_tube(canvas, sma, (7.5, 7.5, 7.0, 6.5), "visceral_fat",
                OUTSIDE_ORGANS | tissue_mask_lookup("pancreas"))      # the SMA's fat collar
    _paint_tube(canvas, sma, (4.5, 4.5, 4.0, 3.5), "artery", OUTSIDE_ORGANS | tissue_mask_lookup("pancreas"))


def paint_viscera(canvas: TissueCanvas, habitus: Habitus, rng: np.random.Generator, size_jitter: float) -> None:
    s = _Sampler(rng, size_jitter)
    paint_esophagus(canvas, s)
    paint_stomach(canvas, s)
    paint_liver(canvas, s)
    paint_spleen(canvas, s, habitus)
    upper_poles = paint_kidneys(canvas, s)
    paint_gallbladder(canvas, s)
    pancreas_shift = s.shift(3.0)
    paint_pancreas(canvas, pancreas_shift, s)
    paint_duodenum(canvas, pancreas_shift, s)
    paint_adrenals(canvas, upper_poles, s)
    paint_portal_splenic_veins(canvas, pancreas_shift)
    paint_great_vessels(canvas, pancreas_shift)
