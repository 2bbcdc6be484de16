"""Outlier energy of a chunk, measured on its pixels before the model sees it.

A chunk's retention must be chosen before SGLang prefills it (the request carries it), so the
budget cannot wait for the KV's own frequency spectrum. This proxy follows the same idea on
the pixel signal the visual tokens are made from: the share of spectral energy that is not
smooth, in space (2-D DCT of a coarse grey grid per frame, energy outside the lowest
``low_band`` fraction of frequencies) and in time (frame-to-frame change relative to the
chunk's contrast). Both lie in [0, 1]; the energy is their mean.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.fft import dctn

from .types import Frame

__all__ = ["chunk_outlier_energy", "GRID_SIZE"]

GRID_SIZE = 16  # frames are averaged down to GRID_SIZE x GRID_SIZE grey cells


def _grey_grid(pixels: np.ndarray) -> np.ndarray:
    """``[height, width, 3]`` uint8 -> ``[GRID_SIZE, GRID_SIZE]`` float64 in [0, 1]."""
    grey = pixels.astype(np.float64).mean(axis=2) / 255.0
    height, width = grey.shape
    rows = np.linspace(0, height, GRID_SIZE + 1).astype(int)
    cols = np.linspace(0, width, GRID_SIZE + 1).astype(int)
    grid = np.empty((GRID_SIZE, GRID_SIZE))
    for i in range(GRID_SIZE):
        for j in range(GRID_SIZE):
            cell = grey[rows[i] : max(rows[i + 1], rows[i] + 1), cols[j] : max(cols[j + 1], cols[j] + 1)]
            grid[i, j] = cell.mean()
    return grid


def chunk_outlier_energy(frames: Sequence[Frame], low_band: float = 0.2) -> float:
    """Outlier energy in [0, 1] of a chunk's frames (0 for flat, static video)."""
    if not frames:
        raise ValueError("chunk_outlier_energy needs at least one frame")
    if not 0.0 < low_band < 1.0:
        raise ValueError(f"low_band={low_band!r} is outside (0, 1)")
    grids = np.stack([_grey_grid(frame.pixels) for frame in frames])  # [num_frames, G, G]

    coefficients = dctn(grids - grids.mean(axis=(1, 2), keepdims=True), axes=(1, 2), norm="ortho")
    frequency = np.add.outer(np.arange(GRID_SIZE), np.arange(GRID_SIZE))  # u + v
    high = frequency > low_band * 2 * (GRID_SIZE - 1)
    total_energy = float((coefficients**2).sum())
    spatial = float((coefficients[:, high] ** 2).sum()) / total_energy if total_energy > 1e-12 else 0.0

    if len(frames) > 1:
        change = float(np.abs(np.diff(grids, axis=0)).mean())
        contrast = float(np.abs(grids - grids.mean()).mean())
        temporal = min(1.0, change / contrast) if contrast > 1e-6 else 0.0
    else:
        temporal = 0.0
    return 0.5 * spatial + 0.5 * temporal
