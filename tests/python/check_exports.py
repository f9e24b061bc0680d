"""Read ganscope's Python-facing outputs with the Python tools themselves (issue 22, part 4).

    python3 tests/python/check_exports.py --run RUN_FOLDER [--npy FILE.npy]

- TensorBoard: the run folder's event file(s) through tensorboard's own EventAccumulator
  (`pip install tensorboard`): the train/* and diagnostics/* scalars must match
  metrics.jsonl, and the samples/wall images must decode.
- NumPy: `numpy.load` of a `ganscope sample --npy` file and its `.conditions.npy`.
Exits non-zero on the first mismatch.
"""

import argparse
import io
import json
import os

import numpy as np


def check_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    print("scalar tags:", len(tags["scalars"]), sorted(tags["scalars"])[:6], "...")
    print("image tags:", tags["images"])
    lines = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    logged = [l for l in lines if "d_loss" in l]
    d_loss = acc.Scalars("train/d_loss")
    assert [e.step for e in d_loss] == [l["step"] for l in logged], "train/d_loss steps"
    for e, l in zip(d_loss, logged):
        assert abs(e.value - l["d_loss"]) <= 1e-6 * max(1.0, abs(l["d_loss"])), (e, l)
    print(f"train/d_loss: {len(d_loss)} points, equal to metrics.jsonl")
    checks = [l for l in lines if "diagnostics" in l]
    if checks:
        prec = acc.Scalars("diagnostics/precision")
        assert [e.step for e in prec] == [c["step"] for c in checks]
        for e, c in zip(prec, checks):
            want = c["diagnostics"]["report"]["prdc"]["precision"]
            assert abs(e.value - want) < 1e-6, (e, want)
        print(f"diagnostics/precision: {len(prec)} points, equal to metrics.jsonl")
    if "samples/wall" in tags["images"]:
        from PIL import Image

        imgs = acc.Images("samples/wall")
        for e in imgs:
            im = Image.open(io.BytesIO(e.encoded_image_string))
            assert im.size == (e.width, e.height), (im.size, e.width, e.height)
        print(f"samples/wall: {len(imgs)} images at steps {[e.step for e in imgs]}, "
              f"{imgs[-1].width}x{imgs[-1].height}")


def check_npy(path):
    x = np.load(path)
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1, (x.dtype, x.min(), x.max())
    print(f"{path}: {x.dtype} {x.shape}, range [{x.min():.3f}, {x.max():.3f}]")
    cpath = path[: -len(".npy")] + ".conditions.npy"
    if os.path.exists(cpath):
        c = np.load(cpath)
        assert c.shape[0] == x.shape[0], (c.shape, x.shape)
        print(f"{cpath}: {c.dtype} {c.shape}, labels per row {sorted(set(c.sum(1).tolist()))}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run")
    ap.add_argument("--npy")
    a = ap.parse_args()
    if a.run:
        check_tensorboard(a.run)
    if a.npy:
        check_npy(a.npy)
    print("ok")


if __name__ == "__main__":
    main()
