"""Shipped weights: a plain state_dict, its sha256 and a metadata JSON, verified before loading.

Layout of a weights folder (``weights/`` in the repository):
  ``<name>.json``          metadata: version, architecture, preprocessing, classes, metrics ...
  ``<name>-<sha8>.pt``     the state_dict (torch.save), named with the first 8 hex of its sha256
  ``SHA256SUMS``           ``sha256  filename`` lines, as written by sha256sum
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any


class WeightsError(RuntimeError):
    """The weights are missing, corrupted or do not match their recorded hash."""


def sha256sum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_weights_dirs() -> list[Path]:
    """Where shipped weights are looked for: $DEFACE_WEIGHTS, the checkout, the install prefix."""
    dirs = []
    if os.environ.get("DEFACE_WEIGHTS"):
        dirs.append(Path(os.environ["DEFACE_WEIGHTS"]))
    dirs.append(Path(__file__).resolve().parents[1] / "weights")
    dirs.append(Path(sys.prefix) / "share" / "deface" / "weights")
    return dirs


def find_metadata(path: str | Path | None = None) -> Path:
    """The metadata JSON for ``path`` (a .json, a .pt beside its .json, or a folder), or the default."""
    if path is not None:
        p = Path(path)
        if p.is_dir():
            candidates = sorted(p.glob("*.json"))
        elif p.suffix == ".json":
            candidates = [p]
        else:
            stem = p.name.rsplit("-", 1)[0] if "-" in p.stem else p.stem
            candidates = [p.with_name(stem + ".json")]
        candidates = [c for c in candidates if c.exists()]
        if not candidates:
            raise WeightsError(f"no weights metadata (.json) found for {path}")
        return candidates[-1]
    for d in default_weights_dirs():
        found = sorted(d.glob("deface_*.json")) if d.is_dir() else []
        if found:
            return found[-1]
    raise WeightsError("no shipped weights found; pass --weights or set DEFACE_WEIGHTS")


# Every key a metadata JSON may hold (deface.train.build_metadata writes them; scripts add the
# checkpoint and evaluation): a misspelled key is refused, not silently ignored.
METADATA_KEYS = {"name", "version", "deface_version", "architecture", "preprocessing", "classes", "postprocessing",
                 "training", "metrics", "torch_version", "monai_version", "git_commit", "intended_use", "license",
                 "checkpoint", "file", "sha256", "evaluation"}
PREPROCESSING_KEYS = {"orientation", "spacing_mm", "multiple", "intensity", "input_shape"}


def validate_metadata(meta: dict[str, Any], where: str = "weights metadata") -> None:
    """Raise WeightsError for an unknown key at the top level or in "preprocessing" (the
    "postprocessing" keys are checked against PostprocessConfig by the Defacer), a missing
    "architecture", or a preprocessing the wrapper does not implement."""
    unknown = sorted(set(meta) - METADATA_KEYS)
    pre = meta.get("preprocessing", {})
    unknown += [f"preprocessing.{k}" for k in sorted(set(pre) - PREPROCESSING_KEYS)]
    if unknown:
        raise WeightsError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if "architecture" not in meta:
        raise WeightsError(f"{where}: no \"architecture\"")
    if pre.get("orientation", "RAS") != "RAS":
        raise WeightsError(f"{where}: preprocessing.orientation {pre['orientation']!r}: only RAS is implemented")


def read_metadata(path: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    meta_path = find_metadata(path)
    return json.loads(meta_path.read_text()), meta_path


def load_state_dict(path: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, metadata), after checking the file's sha256 against the metadata.

    Uses ``torch.load(weights_only=True)``, which never unpickles arbitrary objects.
    """
    import torch

    meta, meta_path = read_metadata(path)
    validate_metadata(meta, str(meta_path))
    weights_file = meta_path.parent / meta["file"]
    if not weights_file.exists():
        raise WeightsError(f"weights file {weights_file} is missing")
    actual = sha256sum(weights_file)
    if actual != meta["sha256"]:
        raise WeightsError(f"{weights_file}: sha256 mismatch: expected {meta['sha256']}, got {actual}")
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise WeightsError(f"{weights_file}: cannot be read as a state_dict ({exc})") from exc
    return state, meta


def export_weights(state_dict: dict[str, Any], metadata: dict[str, Any], outdir: Path, name: str) -> Path:
    """Write ``<name>-<sha8>.pt``, ``<name>.json`` and update ``SHA256SUMS``; return the .json path."""
    import torch

    outdir.mkdir(parents=True, exist_ok=True)
    tmp = outdir / f"{name}.tmp.pt"
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp)
    digest = sha256sum(tmp)
    final = outdir / f"{name}-{digest[:8]}.pt"
    os.replace(tmp, final)
    meta = dict(metadata, file=final.name, sha256=digest)
    meta_path = outdir / f"{name}.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    sums = outdir / "SHA256SUMS"
    lines = [ln for ln in (sums.read_text().splitlines() if sums.exists() else []) if not ln.endswith(f"  {final.name}")]
    lines.append(f"{digest}  {final.name}")
    sums.write_text("\n".join(lines) + "\n")
    return meta_path
