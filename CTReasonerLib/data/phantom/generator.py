"""``generate_phantom(seed, config)``: one labelled abdominal CT volume, deterministic in its seed."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ...io.volume import Volume
from .body import paint_body_wall, paint_bowel, paint_chest, paint_psoas, paint_ribs, paint_spine, paint_table
from .canvas import TissueCanvas
from .config import PhantomConfig
from .geometry import DIRECTIONS_RAS, PhantomGrid, smooth_random_field
from .habitus import RIGHT_KIDNEY_LOWER_POLE, Habitus, sample_habitus
from .rendering import render_ct
from .tissues import label_lookup
from .viscera import paint_viscera

_TOP_MARGIN = 8.0       # nominal mm kept above the higher diaphragm dome
_BOTTOM_MARGIN = 15.0   # nominal mm kept below the right kidney's lower pole
_FINE_SCALE = 0.35      # a second, finer deformation field (this fraction of the correlation length) ...
_FINE_AMPLITUDE = 0.2   # ... with this fraction of the amplitude roughens organ outlines


def generate_phantom(seed: int, config: Optional[PhantomConfig] = None) -> Tuple[Volume, Volume]:
    """Generate one phantom: (CT in HU as int16, label map as uint8) on the same grid.

    Labels are the organs.py values (1 spleen ... 14 duodenum), 0 elsewhere. The grid is a Slicer-style
    LPS-acquired axial CT: directions diag(-1, -1, 1) in RAS, arrays indexed [k, j, i]. The same seed and
    config always give identical arrays and geometry.
    """
    config = (config or PhantomConfig()).validate()
    rng = np.random.default_rng(int(seed))
    habitus = sample_habitus(rng, config)
    grid = sample_grid(rng, config, habitus)
    phase_index = rng.choice(len(config.contrast_phases), p=config.phase_weights())
    phase = config.contrast_phases[phase_index]
    enhancement_gain = float(rng.uniform(*config.enhancement_gain_range))
    noise_std = float(rng.uniform(*config.noise_std_range))

    canvas = _deformed_canvas(rng, grid, habitus, config)
    paint_body_wall(canvas, habitus)
    paint_table(canvas, habitus, rng)
    paint_chest(canvas, habitus)
    paint_bowel(canvas, rng)
    paint_viscera(canvas, habitus, rng, config.organ_size_jitter)
    paint_psoas(canvas)
    paint_spine(canvas, rng)
    paint_ribs(canvas, habitus)

    labels = label_lookup()[canvas.tissue]
    ct = render_ct(canvas.tissue, grid, rng, phase, enhancement_gain, noise_std, config.blur_psf_mm)
    metadata = {"phantom_seed": str(int(seed)), "contrast_phase": phase,
                "enhancement_gain": f"{enhancement_gain:.3f}", "noise_std_hu": f"{noise_std:.2f}"}
    common = dict(spacing=grid.spacing, origin=grid.origin, directions=DIRECTIONS_RAS)
    name = f"phantom_{int(seed):04d}"
    return (Volume(ct, name=f"{name}_ct", metadata=dict(metadata), **common),
            Volume(labels, name=f"{name}_labels", metadata=dict(metadata), **common))


def sample_grid(rng: np.random.Generator, config: PhantomConfig, habitus: Habitus) -> PhantomGrid:
    """Spacing, field of view and scan range for this patient.

    The field of view is chosen to hold the body where the range allows (as a technologist would), and the
    scan range runs from just above the diaphragm to below the kidneys; a longer range extends it into the
    chest and pelvis, a shorter one cuts both ends.
    """
    size_i, size_j, size_k = (int(n) for n in config.shape)
    if config.in_plane_spacing_range is not None:
        spacing = float(rng.uniform(*config.in_plane_spacing_range))
    else:
        low, high = config.field_of_view_range
        anterior, posterior = habitus.body_half_depth_mm
        needed = 2.0 * max(habitus.body_half_width_mm, anterior, posterior) + 20.0
        spacing = float(rng.uniform(min(max(low, needed), high), high)) / size_i
    slice_spacing = float(rng.uniform(*config.slice_spacing_range))

    anterior, posterior = habitus.body_half_depth_mm
    centre_r = habitus.offset[0] + rng.normal(0.0, 4.0)
    centre_a = habitus.offset[1] + 0.5 * (anterior - posterior) + rng.normal(0.0, 4.0)
    top = max(habitus.dome_right, habitus.dome_left) + _TOP_MARGIN
    bottom = RIGHT_KIDNEY_LOWER_POLE - _BOTTOM_MARGIN
    span = (top - bottom) * habitus.scale[2]
    coverage = size_k * slice_spacing
    top_ras = habitus.offset[2] + top * habitus.scale[2]
    if coverage >= span:
        top_ras += rng.uniform(0.0, min(coverage - span, 80.0))
    else:
        top_ras -= (span - coverage) * rng.uniform(0.3, 0.7)
    origin = (centre_r + 0.5 * (size_i - 1) * spacing,
              centre_a + 0.5 * (size_j - 1) * spacing,
              top_ras - (size_k - 1) * slice_spacing)
    return PhantomGrid((size_i, size_j, size_k), (spacing, spacing, slice_spacing), tuple(float(v) for v in origin))


def _deformed_canvas(rng: np.random.Generator, grid: PhantomGrid, habitus: Habitus,
                     config: PhantomConfig) -> TissueCanvas:
    """Nominal coordinates of every voxel after a smooth random displacement (a coarse plus a finer field, mm)."""
    axes = grid.axis_coordinates()
    coarse = (config.deformation_correlation_mm,) * 3
    fine = (config.deformation_correlation_mm * _FINE_SCALE,) * 3
    coordinates = []
    max_displacement = 0.0
    for axis in range(3):
        field = smooth_random_field(rng, axes, coarse)
        field *= np.float32(config.deformation_mm)
        detail = smooth_random_field(rng, axes, fine)
        detail *= np.float32(config.deformation_mm * _FINE_AMPLITUDE)
        field += detail
        max_displacement = max(max_displacement, float(np.abs(field).max()))
        shape = [1, 1, 1]
        shape[2 - axis] = -1
        field += axes[axis].reshape(shape)
        field -= np.float32(habitus.offset[axis])
        field *= np.float32(1.0 / habitus.scale[axis])
        coordinates.append(field)
    return TissueCanvas(grid, *coordinates, max_displacement=max_displacement,
                        scale=habitus.scale, offset=habitus.offset)
