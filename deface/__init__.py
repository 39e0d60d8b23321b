"""deface: remove the face from head MRI with a 3D U-Net, never touching the brain.

The heavy modules (torch, monai) load lazily so ``deface-infer --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Class indices used by labels, the network and the wrapper.
BACKGROUND, FACE, BRAIN, EARS = 0, 1, 2, 3
CLASS_NAMES = ("background", "face", "brain")
# How removed voxels are replaced (deface.inference.Defacer.replace); the first is the default.
MODES = ("zero", "noise", "blur", "fill", "reface")

if TYPE_CHECKING:  # pragma: no cover
    from deface.inference import Defacer, DefaceResult

__all__ = ["Defacer", "DefaceResult", "__version__", "BACKGROUND", "FACE", "BRAIN", "EARS", "CLASS_NAMES", "MODES"]


def __getattr__(name: str) -> Any:
    if name in ("Defacer", "DefaceResult"):
        from deface import inference

        return getattr(inference, name)
    raise AttributeError(name)
