"""Seconds of each stage of defacing one file inside one fresh process, imports included.

    python scripts/stage_times.py HEAD.nii.gz [--weights DIR]

Nothing is imported before the clock starts, so "import" is what a cold deface-infer pays for
torch, MONAI, nibabel and the package. Called by scripts/benchmark.py --versus-niimath.
"""

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image", type=Path)
    p.add_argument("--weights", default=None)
    args = p.parse_args()
    from deface import io
    from deface.inference import Defacer

    t1 = time.perf_counter()
    d = Defacer(weights=args.weights, device="cpu")
    t2 = time.perf_counter()
    volume = io.load(args.image)
    t3 = time.perf_counter()
    volume, canon, registration = d.prepare(volume)
    t4 = time.perf_counter()
    probs = d.predict([canon])[0]
    t5 = time.perf_counter()
    result = d.apply(volume, canon, probs, registration)
    t6 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:  # never beside the input (e.g. inside the package)
        io.save(volume, result.raw, Path(out) / args.image.name)
    t7 = time.perf_counter()
    reg_s = result.stats["atlas_s"]  # in prepare, or in apply when prepare deferred it (a small image)
    reg_prepare = registration.seconds if registration is not None else 0.0
    print(f"stages in one fresh process: import {t1 - T0:.2f} s, model load {t2 - t1:.2f} s, load {t3 - t2:.2f} s, "
          f"preprocess {t4 - t3 - reg_prepare:.2f} s, registration {reg_s:.2f} s, network {t5 - t4:.2f} s, "
          f"postprocess {t6 - t5 - (reg_s - reg_prepare):.2f} s, save {t7 - t6:.2f} s, total {t7 - T0:.2f} s; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
