"""Quality control: one PNG per file (surface renders before/after, mask on mid-slices) and one
self-contained HTML report per batch. Needs matplotlib (the ``qc``, ``train`` or ``dev`` extra)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ras_1mm(volumes: list[np.ndarray], affine: np.ndarray, mode: str = "bilinear", max_size: int = 320
            ) -> list[np.ndarray]:
    """Volumes on one grid (same shape, ``affine``) resampled to a 1 mm RAS grid for display."""
    import torch

    from deface.preprocessing import Grid, canonical_grid, resample

    grid = canonical_grid(Grid(tuple(volumes[0].shape[:3]), affine), spacing=1.0, multiple=1, max_size=max_size)
    stack = torch.from_numpy(np.nan_to_num(np.stack(volumes).astype(np.float32)))
    return list(resample(stack, affine, grid, mode=mode).numpy())


def mid_slices(before: np.ndarray, after: np.ndarray, mask: np.ndarray, affine: np.ndarray):
    """(before, after, mask) on a 1 mm RAS grid and the slice centre (through the removed region)."""
    b, a, m = ras_1mm([before, after, mask], affine)
    idx = np.argwhere(m > 0.5)
    c = idx.mean(0).astype(int) if len(idx) else np.array(m.shape) // 2
    c[0] = m.shape[0] // 2
    return b, a, m, c


def qc_png(before: np.ndarray, after: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: Path,
           title: str = "", check=None, spacing: float = 1.0) -> None:
    """Rows: renders of the input, renders of the output (front, +-45 degrees, profile), and
    sagittal/axial/coronal slices of the output with the removed region outlined in red."""
    from deface.render import render_views

    plt = pyplot()
    views_b, threshold = render_views(before, affine, spacing=spacing)
    views_a, _ = render_views(after, affine, threshold=threshold, spacing=spacing)
    b, a, m, c = mid_slices(before, after, mask, affine)
    fig, axes = plt.subplots(3, 4, figsize=(13, 9.5))
    for row, views in enumerate((views_b, views_a)):
        for col, (name, pic) in enumerate(views.items()):
            ax = axes[row, col]
            ax.imshow(pic, cmap="gray", vmin=0, vmax=255)
            label = f"{'input' if row == 0 else 'defaced'}: {name}"
            if check is not None:
                n = (check.original_views if row == 0 else check.defaced_views).get(name, 0)
                label += f" ({n} face{'s' if n != 1 else ''} detected)"
            ax.set_title(label, fontsize=9, color="red" if check is not None and row == 1 and n else "black")
            ax.axis("off")
    vmax = float(np.percentile(b, 99.5)) or 1.0
    slices = ((a[c[0]], m[c[0]], "sagittal"), (a[:, :, c[2]], m[:, :, c[2]], "axial"), (a[:, c[1]], m[:, c[1]], "coronal"))
    for col, (sl, msl, name) in enumerate(slices):
        ax = axes[2, col]
        ax.imshow(sl.T, origin="lower", cmap="gray", vmin=0, vmax=vmax)
        if msl.max() > 0.5:
            ax.contour(msl.T, [0.5], colors="red", linewidths=1)
        ax.set_title(f"defaced: {name} (red: removed)", fontsize=9)
        ax.axis("off")
    axes[2, 3].axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def render_grid_png(views_before: dict, views_after: dict, path: str | Path, title: str = "") -> None:
    """Two rows of renders (before, after)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(views_before), figsize=(3.2 * len(views_before), 6))
    for row, views in enumerate((views_before, views_after)):
        for col, (name, pic) in enumerate(views.items()):
            axes[row, col].imshow(pic, cmap="gray", vmin=0, vmax=255)
            axes[row, col].set_title(f"{'before' if row == 0 else 'after'}: {name}", fontsize=9)
            axes[row, col].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def flagged(row: dict[str, Any]) -> list[str]:
    """Why a file needs a look: failures, no face found, a face still detected, brain changed."""
    reasons = []
    if row.get("status") == "failed":
        reasons.append("failed")
    if row.get("status") in ("no face", "brain only", "left whole"):
        reasons.append(row["status"])
    if row.get("face_after"):
        reasons.append("face still detected: " + ", ".join(row["face_after"]))
    if row.get("brain_voxels_changed"):
        reasons.append("brain voxels changed")
    return reasons


def html_report(rows: list[dict[str, Any]], path: Path) -> None:
    """One self-contained HTML page (pictures inlined): flagged files first, then the rest."""
    rows = sorted(rows, key=lambda r: (not flagged(r), str(r.get("file"))))
    cells = []
    for r in rows:
        png = Path(r["png"]) if r.get("png") else None
        img = ""
        if png is not None and png.exists():
            data = base64.b64encode(png.read_bytes()).decode()
            img = f'<img src="data:image/png;base64,{data}" width="640">'
        why = flagged(r)
        check = r.get("check", "did not run (pip install 'deface-mri[qc]')")
        cells.append(
            f"<tr class={'flag' if why else 'ok'}><td><b>{html.escape(str(r.get('file')))}</b><br>"
            f"status: {html.escape(str(r.get('status')))}<br>mode: {html.escape(str(r.get('mode', '-')))}"
            f"{', ears removed' if r.get('ears_removed') else ''}<br>"
            f"{'<span class=why>' + html.escape('; '.join(why)) + '</span><br>' if why else ''}"
            f"removed: {r.get('removed_ml', '-')} mL<br>brain voxels changed: {r.get('brain_voxels_changed', '-')}<br>"
            f"face found by the model: {r.get('face_found', '-')}<br>runtime: {r.get('seconds', '-')} s<br>"
            f"re-identification check: {html.escape(str(check))}<br>{html.escape(str(r.get('details', '')))}</td>"
            f"<td>{img}</td></tr>")
    n_flag = sum(bool(flagged(r)) for r in rows)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>deface report</title>
<style>body{{font-family:sans-serif}} td{{vertical-align:top;padding:6px;border-bottom:1px solid #ccc}}
tr.flag{{background:#fff0f0}} .why{{color:#b00;font-weight:bold}}</style></head><body>
<h1>deface report</h1><p>{len(rows)} file(s), {n_flag} flagged (shown first).</p>
<table>{''.join(cells)}</table></body></html>"""
    path.write_text(page)


def qc_file(volume, result, name: str, dst: Path, spacing: float, seconds: float) -> dict[str, Any]:
    """The QC picture of one defaced file (``<output stem>.png`` beside ``dst``), with the
    re-identification check when its extra is installed; returns the file's report row.
    ``volume`` and ``result``: ``io.Volume`` and ``inference.DefaceResult``."""
    import logging

    from deface import facecheck
    from deface.io import split_suffix

    stem, _ = split_suffix(dst)
    before = volume.reference()
    after = result.volume.scaled(result.raw.reshape(result.raw.shape[:3] + (-1,))[..., 0])
    row = {"file": name, "output": str(dst), "seconds": round(seconds, 2), **result.stats}
    mode = result.stats.get("mode", "zero")
    check = None
    if facecheck.available():
        check, _, _ = facecheck.check_images(before, volume.affine, after, volume.affine, spacing=spacing)
        row["face_after"] = check.face_found_after
        if mode == "reface":
            check.refaced = True
            distance = "no front face to compare" if check.distance is None else f"distance {check.distance:.2f}"
            row["check"] = (f"PASS: the new face is not matched to the input's ({distance})" if check.passed else
                            f"FAIL: the new face matches the input's ({distance} < {facecheck.MATCH_DISTANCE})")
        else:
            row["check"] = ("PASS: no face detected after defacing" if check.passed else
                            "FAIL: face detected in " + ", ".join(check.face_found_after))
        if not check.passed:
            logging.getLogger("deface").warning("%s: re-identification check failed: %s", name, row["check"])
    png = dst.with_name(f"{stem}.png")
    ears = ", ears removed" if result.stats.get("ears_removed") else ""
    qc_png(before, after, result.mask, volume.affine, png, title=f"{Path(name).name} (mode: {mode}{ears})", check=check,
           spacing=spacing)
    row["png"] = str(png)
    return row
