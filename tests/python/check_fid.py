"""ganscope's FID against pytorch-fid's on the same folders and the same weights (issue 22,
part 3).

The real Inception weights (pt_inception-2015-12-05-6726825d.pth) are not available here, so
the network is pytorch-fid's InceptionV3 at full width with seeded random weights and
calibrated BatchNorm statistics, written in the same layout by
`tests/fixtures/fid_inception/make_fixture.py --div 1 --out WEIGHTS_DIR` (that script checks
the key layout and the forward against pytorch-fid's own InceptionV3). pytorch-fid is run as
`python -m pytorch_fid A B` runs it (`calculate_fid_given_paths`, batch 50, dims 2048, CPU),
with its weight download patched to return that file's state_dict; ganscope as
`ganscope fid A B --fid-weights WEIGHTS_DIR/inception.pth`.

Folders: `--make-folders ROOT` renders two sets of 500 PNGs with ganscope (i-CLEVR scenes at
64x64, seed 1, and at 32x32, seed 2: the same kind of scene at two resolutions, so the FID is
far from 0) into ROOT/a and ROOT/b.

Run:
  python3 tests/fixtures/fid_inception/make_fixture.py --div 1 --out /tmp/fidfull
  python3 tests/python/check_fid.py --ganscope target/release/ganscope \\
      --weights /tmp/fidfull/inception.pth --make-folders /tmp/fidcheck
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import time

import torch


def make_folders(ganscope, root, n=500):
    for name, size, seed in [("a", 64, 1), ("b", 32, 2)]:
        tmp = os.path.join(root, f"render-{name}")
        out = os.path.join(root, name)
        if os.path.isdir(out) and len(glob.glob(os.path.join(out, "*.png"))) == n:
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([ganscope, "data", "iclevr", "--size", str(size), "--n-scenes",
                        str(n), "--seed", str(seed), "--out", tmp], check=True)
        files = sorted(glob.glob(os.path.join(tmp, "**", "*.png"), recursive=True))[:n]
        assert len(files) == n, f"{len(files)} renders in {tmp}"
        os.makedirs(out)
        for i, f in enumerate(files):
            shutil.copy(f, os.path.join(out, f"{i:04d}.png"))
    return os.path.join(root, "a"), os.path.join(root, "b")


def pytorch_fid(a, b, weights):
    import pytorch_fid.fid_score as fs
    import pytorch_fid.inception as pi
    sd = torch.load(weights, map_location="cpu")
    sd = dict(sd)
    sd.setdefault("fc.weight", torch.zeros(1008, 2048))
    sd.setdefault("fc.bias", torch.zeros(1008))
    pi.load_state_dict_from_url = lambda *args, **kw: sd
    return fs.calculate_fid_given_paths([a, b], 50, "cpu", 2048, num_workers=0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ganscope", default="target/release/ganscope")
    p.add_argument("--weights", required=True)
    p.add_argument("--make-folders", metavar="ROOT")
    p.add_argument("--a")
    p.add_argument("--b")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.make_folders:
        a, b = make_folders(args.ganscope, args.make_folders)
    else:
        a, b = args.a, args.b
    t = time.time()
    ref = float(pytorch_fid(a, b, args.weights))
    t_ref = time.time() - t
    t = time.time()
    out = subprocess.run([args.ganscope, "fid", a, b, "--fid-weights", args.weights],
                         check=True, capture_output=True, text=True)
    t_ours = time.time() - t
    ours = float(re.search(r"FID:\s+(\S+)", out.stdout).group(1))
    rel = abs(ours - ref) / abs(ref)
    print(f"pytorch-fid FID {ref:.6f} ({t_ref:.0f} s)")
    print(f"ganscope    FID {ours:.6f} ({t_ours:.0f} s)")
    print(f"relative difference {rel:.2e}")
    print(out.stderr.strip())
    assert rel < 5e-3, "more than 0.5% apart"


if __name__ == "__main__":
    main()
