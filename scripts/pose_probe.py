"""Probe (not used by the wrapper): how far the outline search (deface.atlas.head_pose) and a
search scored on the network's own brain and face (atlas brain Dice + the share of the network's
face inside the MNI face region, brain centroids aligned) start from the truth, for the upright
and the tilted (25 deg pitch, 12 deg roll) version of cached heads. "Truth" is the upright head's
registration composed with the known tilt, so upright rows with a large error mean the two
searches disagree with the upright registration (which can be wrong itself).

    python scripts/pose_probe.py real_nichart_demo_s22_flair real_ixi296_t1 real_ixi015_t1
"""
import sys
from pathlib import Path

import numpy as np
import torch


def coarse(x: np.ndarray, aff: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    from deface.preprocessing import antialias

    p, pa = antialias(torch.from_numpy(x.astype(np.float32))[None], aff, 4.0)
    return p[0], pa

def net_search(atlas, probs: torch.Tensor, grid_affine: np.ndarray) -> np.ndarray:
    """A world -> atlas start from the network's brain and face (see the module docstring)."""
    import deface.atlas as A
    from deface.anatomy import face_region_mni

    B, Ba = coarse(probs[2].numpy(), grid_affine)
    F, _ = coarse(probs[1].numpy(), grid_affine)
    M, Ma = coarse((atlas.brain >= 0.5), atlas.affine)
    keep = (B > 0.05) | (F > 0.05)
    idx = torch.nonzero(keep).double()
    P = idx @ torch.from_numpy(Ba[:3, :3]).T + torch.from_numpy(Ba[:3, 3])
    bw, fw = B[keep].double(), F[keep].double()
    cb = (P * bw[:, None]).sum(0) / bw.sum()
    mc = torch.from_numpy(Ma[:3, :3] @ np.argwhere(M.numpy() >= 0.5).mean(0) + Ma[:3, 3])
    toM = torch.from_numpy(np.linalg.inv(Ma)); size = torch.tensor(M.shape, dtype=torch.float64)
    Mg = M[None, None].double(); vol_m = float(M.sum())
    def score(rot):
        r = torch.from_numpy(rot)
        q = (P - cb) @ r.T + mc
        vox = q @ toM[:3, :3].T + toM[:3, 3]
        g = (vox / (size - 1) * 2 - 1).flip(-1)[None, :, None, None, :]
        s = torch.nn.functional.grid_sample(Mg, g, align_corners=True)[0, 0, :, 0, 0]
        brain = 2 * float((s * bw).sum()) / (float(bw.sum()) + vol_m)
        face = float((fw * torch.from_numpy(face_region_mni(q.numpy()))).sum() / fw.sum())
        return brain + face
    best = (score(np.eye(3)), np.eye(3))
    for steps in A.SEARCH_STEPS_DEG:
        base = best[1]
        for a in steps[0]:
            for b in steps[1]:
                for c in steps[2]:
                    rot = A.euler(a, b, c) @ base
                    sc = score(rot)
                    if sc > best[0]: best = (sc, rot)
    out = np.eye(4); out[:3, :3] = best[1]; out[:3, 3] = mc.numpy() - best[1] @ cb.numpy()
    return out


def main(names: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    import deface.atlas as A
    from deface.evaluation import acquisition_variant
    from deface.inference import Defacer
    from deface.preprocessing import rigid_part, to_canonical
    from evaluate import cache_head

    d = Defacer(device="cpu", atlas_guard=False)
    atlas = A.Atlas.load()
    pts_check = np.array([[0, 50, 0], [0, 40, -30], [0, 0, 60], [0, 60, -20]], float)
    for name in names:
        d0, l0, a0 = cache_head(Path("data_cache"), name)
        c0 = to_canonical(d0, a0)
        T0 = A.register_atlas(atlas, c0.image[0].numpy(), c0.grid.affine).to_atlas
        for acq in ("original", "tilted"):
            data, labels, aff = acquisition_variant(d0, l0, a0, acq)
            tilt = aff @ np.linalg.inv(a0)
            truth = T0 @ np.linalg.inv(tilt)
            c = to_canonical(data, aff)
            probs = d.predict([c])[0]
            st = net_search(atlas, probs, c.grid.affine)
            st2 = A.head_pose(atlas, A.Head(c.image[0].numpy(), c.grid.affine))
            def err(T): return round(max(np.linalg.norm((T @ np.linalg.inv(truth) @ np.r_[p, 1])[:3] - p) for p in pts_check), 1)
            def rdeg(T): return round(A.rotation_deg(rigid_part(T[:3,:3]) @ rigid_part(truth[:3,:3]).T), 1)
            print(name, acq, "net search err", err(st), "rot err", rdeg(st), "| outline search err", err(st2), "rot err", rdeg(st2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
