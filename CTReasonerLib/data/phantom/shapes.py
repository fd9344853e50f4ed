"""Implicit shapes evaluated on (deformed) millimetre coordinates.

Each function takes coordinate arrays X, Y, Z (R, A, S in mm, any equal shape, float32) and returns a
float32 field ``q`` that is <= 1 inside the shape and grows outside, so callers can threshold it at
several levels (a wall at q <= 1, its lumen at a smaller level).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def rotation(z_deg: float = 0.0, y_deg: float = 0.0, x_deg: float = 0.0) -> np.ndarray:
    """(3, 3) matrix whose rows are a shape's local axes in RAS (rotations about S, then A, then R)."""
    cz, sz = np.cos(np.radians(z_deg)), np.sin(np.radians(z_deg))
    cy, sy = np.cos(np.radians(y_deg)), np.sin(np.radians(y_deg))
    cx, sx = np.cos(np.radians(x_deg)), np.sin(np.radians(x_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return (rz @ ry @ rx).T


def ellipsoid(X, Y, Z, center: Sequence[float], radii: Sequence[float],
              axes: Optional[np.ndarray] = None) -> np.ndarray:
    """Normalised squared radius of an ellipsoid (rows of ``axes`` = its local axes, default RAS)."""
    dx, dy, dz = X - float(center[0]), Y - float(center[1]), Z - float(center[2])
    if axes is None:
        u, v, w = dx, dy, dz
    else:
        a = [[float(c) for c in row] for row in axes]
        u = a[0][0] * dx + a[0][1] * dy + a[0][2] * dz
        v = a[1][0] * dx + a[1][1] * dy + a[1][2] * dz
        w = a[2][0] * dx + a[2][1] * dy + a[2][2] * dz
    ra, rb, rc = (1.0 / float(r) ** 2 for r in radii)
    return u * u * ra + v * v * rb + w * w * rc


def tube_segment(X, Y, Z, a: Sequence[float], b: Sequence[float], radius_a: float, radius_b: float,
                 metric: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Normalised squared distance to the segment a-b whose radius goes linearly from ``radius_a`` to ``radius_b``.

    ``metric`` weighs the squared distance per axis (a weight < 1 stretches the tube along that axis; a weight
    of 0 extrudes a 2D outline through every slice).
    """
    a = np.asarray(a, dtype=np.float64)
    v = np.asarray(b, dtype=np.float64) - a
    mx, my, mz = (float(m) for m in metric)
    vv = float(mx * v[0] ** 2 + my * v[1] ** 2 + mz * v[2] ** 2)
    dx, dy, dz = X - float(a[0]), Y - float(a[1]), Z - float(a[2])
    if vv > 0:
        t = (dx * float(mx * v[0]) + dy * float(my * v[1]) + dz * float(mz * v[2])) * (1.0 / vv)
        np.clip(t, 0.0, 1.0, out=t)
        dx -= t * float(v[0])
        dy -= t * float(v[1])
        dz -= t * float(v[2])
        r = float(radius_a) + t * float(radius_b - radius_a)
        r *= r
    else:
        r = float(radius_a) ** 2
    dx *= dx
    dy *= dy
    dz *= dz
    q = dx * mx if mx != 1.0 else dx
    q += dy * my if my != 1.0 else dy
    if mz:
        q += dz * mz if mz != 1.0 else dz
    q /= r
    return q


def taper(Z, z_low: float, z_high: float) -> np.ndarray:
    """1 in the middle of [z_low, z_high] falling to 0 at both ends (an elliptic profile), 0 outside."""
    half = 0.5 * (float(z_high) - float(z_low))
    u = (Z - 0.5 * (float(z_low) + float(z_high))) * (1.0 / half)
    return np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0))
