"""Settings of the procedural abdominal CT phantom generator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ...errors import ConfigError
from .tissues import CONTRAST_PHASES

# How often each phase is drawn with the default phases: portal-venous is the routine abdominal scan.
DEFAULT_PHASE_MIX = (0.2, 0.3, 0.5)


@dataclass
class PhantomConfig:
    """What a phantom looks like; every random choice is drawn from these ranges with the phantom's seed.

    In-plane spacing follows from the field of view: a clinical 512² reconstruction of a 330-420 mm field has
    0.64-0.82 mm pixels (inside the usual 0.6-1.0 mm), and a smaller matrix covers the same field with larger
    pixels, so the anatomy (defined in mm) always fits. ``in_plane_spacing_range`` instead fixes the pixel size
    directly; the field of view is then ``I * spacing`` and a small field cuts the body off, as a real
    targeted reconstruction would.
    """

    shape: Tuple[int, int, int] = (256, 256, 96)                 # (I, J, K) voxels
    field_of_view_range: Tuple[float, float] = (330.0, 420.0)    # mm, in plane
    in_plane_spacing_range: Optional[Tuple[float, float]] = None  # mm; overrides field_of_view_range
    slice_spacing_range: Tuple[float, float] = (2.5, 5.0)        # mm between slices
    contrast_phases: Tuple[str, ...] = CONTRAST_PHASES           # phases to choose from
    phase_probabilities: Optional[Tuple[float, ...]] = None      # None: DEFAULT_PHASE_MIX, or uniform over a subset
    noise_std_range: Tuple[float, float] = (6.0, 16.0)           # HU of white noise after the blur
    enhancement_gain_range: Tuple[float, float] = (0.8, 1.2)     # scales contrast uptake (cardiac output, dose)
    deformation_mm: float = 6.0                                  # std of the smooth displacement field
    deformation_correlation_mm: float = 70.0                     # its spatial correlation length
    body_scale_range: Tuple[float, float] = (0.92, 1.08)         # patient size (organ layout and cavity)
    fat_thickness_range: Tuple[float, float] = (6.0, 45.0)       # mm of subcutaneous fat (habitus)
    organ_size_jitter: float = 0.1                               # relative std-like spread of organ sizes
    blur_psf_mm: float = 0.6                                     # sigma of the scanner's in-plane blur

    def validate(self) -> "PhantomConfig":
        if len(self.shape) != 3 or any(int(n) < 8 for n in self.shape):
            raise ConfigError(f"phantom shape must be three sizes (I, J, K) of at least 8 voxels, got {self.shape}",
                              "use e.g. --size 256 256 96")
        for name in ("field_of_view_range", "slice_spacing_range", "noise_std_range", "enhancement_gain_range",
                     "body_scale_range", "fat_thickness_range"):
            low, high = getattr(self, name)
            if not (0 <= low <= high):
                raise ConfigError(f"phantom {name} must be (low, high) with 0 <= low <= high, got {(low, high)}")
        if self.in_plane_spacing_range is not None:
            low, high = self.in_plane_spacing_range
            if not (0 < low <= high):
                raise ConfigError(f"phantom in_plane_spacing_range must be positive (low, high), got {(low, high)}")
        if self.slice_spacing_range[0] <= 0:
            raise ConfigError("phantom slice spacing must be positive")
        unknown = [p for p in self.contrast_phases if p not in CONTRAST_PHASES]
        if unknown or not self.contrast_phases:
            raise ConfigError(f"unknown contrast phase(s) {unknown or '(none given)'}",
                              f"choose from {', '.join(CONTRAST_PHASES)}")
        if self.phase_probabilities is not None and (len(self.phase_probabilities) != len(self.contrast_phases)
                                                     or min(self.phase_probabilities) < 0
                                                     or sum(self.phase_probabilities) <= 0):
            raise ConfigError("phase_probabilities needs one non-negative value per contrast phase, not all zero")
        return self

    def phase_weights(self) -> Tuple[float, ...]:
        """Probability of each of ``contrast_phases``."""
        if self.phase_probabilities is not None:
            weights = [float(p) for p in self.phase_probabilities]
        elif tuple(self.contrast_phases) == CONTRAST_PHASES:
            weights = list(DEFAULT_PHASE_MIX)
        else:
            weights = [1.0] * len(self.contrast_phases)
        total = sum(weights)
        return tuple(w / total for w in weights)
