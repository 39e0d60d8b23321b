"""Quality-control pictures: mid-slices of the input and the defaced output, mask in red."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def qc_png(before: np.ndarray, after: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Sagittal, axial and coronal slices (through the removed region) on a 1 mm RAS grid.

    Needs matplotlib (the ``train`` or ``dev`` extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from deface.preprocessing import Grid, canonical_grid, resample

    grid = canonical_grid(Grid(tuple(before.shape[:3]), affine), spacing=1.0, multiple=1, max_size=320)
    stack = torch.from_numpy(np.stack([before, after, mask]).astype(np.float32))
    b, a, m = resample(stack, affine, grid).numpy()
    idx = np.argwhere(m > 0.5)
    c = idx.mean(0).astype(int) if len(idx) else np.array(m.shape) // 2
    cx = m.shape[0] // 2
    vmax = float(np.percentile(b, 99.5)) or 1.0
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.5))
    for row, img in enumerate((b, a)):
        for col, (sl, name) in enumerate(((img[cx], "sagittal"), (img[:, :, c[2]], "axial"), (img[:, c[1]], "coronal"))):
            ax = axes[row, col]
            ax.imshow(sl.T, origin="lower", cmap="gray", vmin=0, vmax=vmax)
            if row == 0:
                msl = (m[cx], m[:, :, c[2]], m[:, c[1]])[col]
                ax.contour(msl.T, [0.5], colors="red", linewidths=1)
            ax.set_title(f"{'input' if row == 0 else 'defaced'}: {name}")
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
