#!/usr/bin/env python3
"""PyTorch reference for `ganscope bench` (src/bench.rs): the same workloads, layer shapes,
initialisation (weights N(0, 0.02), no conv biases, BatchNorm gamma N(1, 0.02) beta 0),
optimiser (Adam lr 2e-4 betas (0.5, 0.999)), loss (BCE with logits) and batch, timed the
same way (median of N iterations after W warm-up ones), printing the same
`bench model=... batch=... ms_per_iter=... images_per_s=... gflops=...` lines.

FLOPs are counted as in src/bench.rs: forward FLOPs of G and D at the batch (2 per
multiply-accumulate of Conv2d, ConvTranspose2d and Linear), 3x for a backpropagated pass,
1x forward-only, 6x a gradient-penalty pass.

`iclevr-sagan` mirrors the engine's `iclevr-sagan` preset (src/model/resnet.rs, layers.rs,
config.rs): ResNet G (g_ch 32, conditional BatchNorm over 24 labels, self-attention at 32x32)
and D (d_ch 32, self-attention at 32x32, projection), spectral norm on every weight layer of
both (torch.nn.utils.spectral_norm, one power iteration per training forward), Xavier-uniform
weights, zero biases, hinge loss, Adam lr_G 1e-4 lr_D 4e-4 betas (0, 0.9), n_critic 1; one
iteration = one D step then one G step on fresh noise and conditions, as the engine's
Trainer. Data: random images and random multi-hot labels (1-3 of 24) instead of rendered
i-CLEVR scenes (same shapes, same cost).

Usage: python bench/torch_bench.py [--model M] [--batch B] [--iters N] [--warmup W] [--threads T]
       [--device cpu|cuda]

On a GPU (`--device cuda`, PyTorch eager with its defaults) every tensor and module is
created there (modules under `with torch.device(...)`, tensors with `device=`; not through
torch.set_default_device, whose per-call overhead would only slow PyTorch), each iteration ends with torch.cuda.synchronize(),
and the floor is an 8192^3 f32 matmul on the device, as `ganscope bench --device cuda`.
"""

import argparse
import os
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# The device every workload runs on (set by main). Tensors are created there directly
# (`device=DEV`), not through torch.set_default_device: that mode intercepts every torch call
# in Python, an overhead PyTorch's users do not pay.
DEV = torch.device("cpu")


def randn(*shape):
    return torch.randn(*shape, device=DEV)


def rand(*shape):
    return torch.rand(*shape, device=DEV)


def randint(lo, hi, shape):
    return torch.randint(lo, hi, shape, device=DEV)


MODELS = ["dcgan64", "cdcgan28", "wgangp-critic64", "iclevr-sagan"]


def init_weights(m):
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def g64():
    return nn.Sequential(
        nn.ConvTranspose2d(100, 512, 4, 1, 0, bias=False), nn.BatchNorm2d(512), nn.ReLU(True),
        nn.ConvTranspose2d(512, 256, 4, 2, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU(True),
        nn.ConvTranspose2d(256, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(True),
        nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
        nn.ConvTranspose2d(64, 3, 4, 2, 1, bias=False), nn.Tanh(),
    )


def d64(batch_norm=True):
    bn = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
    # inplace=False: the WGAN-GP double backward needs the pre-activation values.
    return nn.Sequential(
        nn.Conv2d(3, 64, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(64, 128, 4, 2, 1, bias=False), bn(128), nn.LeakyReLU(0.2),
        nn.Conv2d(128, 256, 4, 2, 1, bias=False), bn(256), nn.LeakyReLU(0.2),
        nn.Conv2d(256, 512, 4, 2, 1, bias=False), bn(512), nn.LeakyReLU(0.2),
        nn.Conv2d(512, 1, 4, 1, 0, bias=False),
    )


class G28(nn.Module):
    def __init__(self):
        super().__init__()
        self.input = nn.Linear(110, 128 * 7 * 7)
        self.input_bn = nn.BatchNorm1d(128 * 7 * 7)
        self.conv1 = nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.ConvTranspose2d(64, 1, 4, 2, 1, bias=False)

    def forward(self, z, y):
        h = F.relu(self.input_bn(self.input(torch.cat([z, y], 1))))
        h = h.view(-1, 128, 7, 7)
        h = F.relu(self.bn1(self.conv1(h)))
        return torch.tanh(self.conv2(h))


class D28(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(11, 64, 4, 2, 1, bias=False)
        self.conv2 = nn.Conv2d(64, 128, 4, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(128)
        self.out = nn.Linear(128 * 7 * 7, 1)

    def forward(self, x, y):
        b = x.shape[0]
        planes = y.view(b, 10, 1, 1).expand(b, 10, 28, 28)
        h = F.leaky_relu(self.conv1(torch.cat([x, planes], 1)), 0.2)
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.2)
        return self.out(h.flatten(1)).view(-1)


ATTN_FLOPS = [0]


def forward_flops(module, *args):
    """Forward FLOPs (2 per multiply-accumulate) of Conv2d, ConvTranspose2d, Linear and the
    attention products."""
    total = [0]
    ATTN_FLOPS[0] = 0

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            total[0] += 2 * out.numel() * m.in_channels * k
        elif isinstance(m, nn.ConvTranspose2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            total[0] += 2 * inp[0].numel() * m.out_channels * k
        elif isinstance(m, nn.Linear):
            total[0] += 2 * inp[0].numel() * m.out_features

    hs = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.no_grad():
        out = module(*args)
    for h in hs:
        h.remove()
    return total[0] + ATTN_FLOPS[0], out


def adam(m):
    return torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999), eps=1e-8)


def bce(logits, one):
    t = torch.ones_like(logits) if one else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, t)


class Dcgan64:
    def __init__(self, b):
        torch.manual_seed(0)
        self.g, self.d = g64(), d64(True)
        self.g.apply(init_weights)
        self.d.apply(init_weights)
        self.og, self.od = adam(self.g), adam(self.d)
        self.b = b
        self.real = rand(b, 3, 64, 64) * 2 - 1
        fg, x = forward_flops(self.g, randn(b, 100, 1, 1))
        fd, _ = forward_flops(self.d, x)
        self.flops = 3 * fg + 9 * fd

    def step(self):
        z = randn(self.b, 100, 1, 1)
        fake = self.g(z)
        self.od.zero_grad(set_to_none=True)
        d_loss = bce(self.d(self.real).view(-1), True) + bce(self.d(fake.detach()).view(-1), False)
        d_loss.backward()
        self.od.step()
        self.og.zero_grad(set_to_none=True)
        g_loss = bce(self.d(fake).view(-1), True)
        g_loss.backward()
        self.og.step()
        return [d_loss.item(), g_loss.item()]


class Cdcgan28:
    def __init__(self, b):
        torch.manual_seed(0)
        self.g, self.d = G28(), D28()
        self.g.apply(init_weights)
        self.d.apply(init_weights)
        self.og, self.od = adam(self.g), adam(self.d)
        self.b = b
        self.real = rand(b, 1, 28, 28) * 2 - 1
        self.real_y = F.one_hot(randint(0, 10, (b,)), 10).float()
        fg, x = forward_flops(self.g, randn(b, 100), self.real_y)
        fd, _ = forward_flops(self.d, x, self.real_y)
        self.flops = 3 * fg + 9 * fd

    def step(self):
        z = randn(self.b, 100)
        y = F.one_hot(randint(0, 10, (self.b,)), 10).float()
        fake = self.g(z, y)
        self.od.zero_grad(set_to_none=True)
        d_loss = bce(self.d(self.real, self.real_y), True) + bce(self.d(fake.detach(), y), False)
        d_loss.backward()
        self.od.step()
        self.og.zero_grad(set_to_none=True)
        g_loss = bce(self.d(fake, y), True)
        g_loss.backward()
        self.og.step()
        return [d_loss.item(), g_loss.item()]


class WganGpCritic64:
    def __init__(self, b):
        torch.manual_seed(0)
        self.g, self.d = g64(), d64(False)
        self.g.apply(init_weights)
        self.d.apply(init_weights)
        self.od = adam(self.d)
        self.b = b
        self.real = rand(b, 3, 64, 64) * 2 - 1
        fg, x = forward_flops(self.g, randn(b, 100, 1, 1))
        fd, _ = forward_flops(self.d, x)
        self.flops = fg + 12 * fd

    def step(self):
        b = self.b
        with torch.no_grad():
            fake = self.g(randn(b, 100, 1, 1))
        eps = rand(b, 1, 1, 1)
        self.od.zero_grad(set_to_none=True)
        wd = self.d(fake).mean() - self.d(self.real).mean()
        x_hat = (eps * self.real + (1 - eps) * fake).requires_grad_(True)
        out = self.d(x_hat).view(-1)
        (g,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
        norm = (g.pow(2).flatten(1).sum(1) + 1e-12).sqrt()
        gp = (norm - 1).pow(2).mean()
        loss = wd + 10 * gp
        loss.backward()
        self.od.step()
        return [loss.item(), gp.item()]


def sn(m):
    nn.init.xavier_uniform_(m.weight)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
    return nn.utils.spectral_norm(m)


def conv(cin, cout, k, bias=True):
    return sn(nn.Conv2d(cin, cout, k, 1, k // 2, bias=bias))


def bn(c):
    b = nn.BatchNorm2d(c)
    nn.init.normal_(b.weight, 1.0, 0.02)
    nn.init.zeros_(b.bias)
    return b


class CondBN(nn.Module):
    """Affine-free BatchNorm, gamma = 1 + W_g c, beta = W_b c."""

    def __init__(self, c, k):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, affine=False)
        self.gamma = sn(nn.Linear(k, c, bias=False))
        self.beta = sn(nn.Linear(k, c, bias=False))

    def forward(self, x, c):
        g = (1 + self.gamma(c))[:, :, None, None]
        return self.bn(x) * g + self.beta(c)[:, :, None, None]


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        ck, cv = max(c // 8, 1), max(c // 2, 1)
        self.query, self.key = conv(c, ck, 1, False), conv(c, ck, 1, False)
        self.value, self.out = conv(c, cv, 1, False), conv(cv, c, 1, False)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, _, h, w = x.shape
        n = h * w
        q = self.query(x).view(b, -1, n)
        k = self.key(x).view(b, -1, n)
        v = self.value(x).view(b, -1, n)
        attn = F.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N, N)
        o = (v @ attn.transpose(1, 2)).view(b, -1, h, w)
        ATTN_FLOPS[0] += 2 * b * n * n * (q.shape[1] + v.shape[1])
        return x + self.gamma * self.out(o)


class ResUp(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.bn1, self.conv1 = CondBN(cin, k), conv(cin, cout, 3)
        self.bn2, self.conv2 = CondBN(cout, k), conv(cout, cout, 3)
        self.shortcut = conv(cin, cout, 1)

    def forward(self, x, c):
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")
        h = self.conv1(up(F.relu(self.bn1(x, c))))
        h = self.conv2(F.relu(self.bn2(h, c)))
        return h + self.shortcut(up(x))


class ResDown(nn.Module):
    def __init__(self, cin, cout, down, first):
        super().__init__()
        self.conv1, self.conv2 = conv(cin, cout, 3), conv(cout, cout, 3)
        self.shortcut = conv(cin, cout, 1) if (cin != cout or down) else None
        self.down, self.first = down, first

    def forward(self, x):
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        if self.shortcut is None:
            s = x
        elif self.first:
            s = self.shortcut(F.avg_pool2d(x, 2))
        else:
            s = self.shortcut(x)
            s = F.avg_pool2d(s, 2) if self.down else s
        return h + s


class SaganG(nn.Module):
    def __init__(self, z=100, k=24, ch=32):
        super().__init__()
        w = [ch * 2 ** min(4 - lv, 3) for lv in range(5)]  # 256 256 128 64 32
        self.input = sn(nn.Linear(z, w[0] * 16))
        self.blocks = nn.ModuleList(ResUp(w[i], w[i + 1], k) for i in range(4))
        self.attention = Attention(w[3])  # after the block that reaches 32x32
        self.out_bn, self.out = bn(w[4]), conv(w[4], 3, 3)
        self.c0 = w[0]

    def forward(self, z, c):
        h = self.input(z).view(-1, self.c0, 4, 4)
        for i, blk in enumerate(self.blocks):
            h = blk(h, c)
            if i == 2:
                h = self.attention(h)
        return torch.tanh(self.out(F.relu(self.out_bn(h))))


class SaganD(nn.Module):
    def __init__(self, k=24, ch=32):
        super().__init__()
        chs = [ch * 2 ** min(lv, 3) for lv in range(5)]
        blocks, cin = [], 3
        for lv in range(5):
            cout = chs[min(lv, 3)]
            blocks.append(ResDown(cin, cout, lv < 4, lv == 0))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.attention = Attention(chs[0])  # after block 0 (32x32)
        self.linear = sn(nn.Linear(cin, 1))
        self.embed = sn(nn.Linear(k, cin, bias=False))

    def forward(self, x, c):
        h = x
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if i == 0:
                h = self.attention(h)
        phi = F.relu(h).sum((2, 3))
        return self.linear(phi).view(-1) + (self.embed(c) * phi).sum(1)


def multi_hot(b, k=24):
    y = torch.zeros(b, k, device="cpu")
    for i in range(b):
        y[i, torch.randperm(k)[: int(torch.randint(1, 4, (1,)))]] = 1.0
    return y.to(DEV)


class IclevrSagan:
    def __init__(self, b):
        torch.manual_seed(0)
        self.g, self.d = SaganG(), SaganD()
        self.og = torch.optim.Adam(self.g.parameters(), lr=1e-4, betas=(0.0, 0.9), eps=1e-8)
        self.od = torch.optim.Adam(self.d.parameters(), lr=4e-4, betas=(0.0, 0.9), eps=1e-8)
        self.b = b
        self.real = rand(b, 3, 64, 64) * 2 - 1
        self.real_c = multi_hot(b)
        self.g.eval()
        self.d.eval()
        fg, x = forward_flops(self.g, randn(b, 100), self.real_c)
        fd, _ = forward_flops(self.d, x, self.real_c)
        self.g.train()
        self.d.train()
        self.flops = (fg + 6 * fd) + 3 * fg + 3 * fd

    def step(self):
        b = self.b
        with torch.no_grad():
            fake = self.g(randn(b, 100), self.real_c)
        self.od.zero_grad(set_to_none=True)
        d_loss = F.relu(1 - self.d(self.real, self.real_c)).mean() + F.relu(1 + self.d(fake, self.real_c)).mean()
        d_loss.backward()
        self.od.step()
        c = multi_hot(b)
        self.og.zero_grad(set_to_none=True)
        g_loss = -self.d(self.g(randn(b, 100), c), c).mean()
        g_loss.backward()
        self.og.step()
        return [d_loss.item(), g_loss.item()]


WORKLOADS = {
    "dcgan64": Dcgan64,
    "cdcgan28": Cdcgan28,
    "wgangp-critic64": WganGpCritic64,
    "iclevr-sagan": IclevrSagan,
}
DEFAULT_BATCH = {"iclevr-sagan": 16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgemm_gflops(device, n=2048):
    a, b = rand(n, n), rand(n, n)
    torch.mm(a, b)
    sync(device)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts) / 1e9


def quantile(s, q):
    pos = q * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# The convolutions of dcgan64 / wgangp-critic64 and cdcgan28, as `ganscope bench --model
# conv-layers` lists them (src/bench/kernels.rs, CONV_LAYERS): (name, transposed, x dims
# without the batch, w dims, stride, padding).
CONV_LAYERS = {
    "dcgan64": [
        ("G convT 100->512 1->4", True, (100, 1, 1), (100, 512, 4, 4), 1, 0),
        ("G convT 512->256 4->8", True, (512, 4, 4), (512, 256, 4, 4), 2, 1),
        ("G convT 256->128 8->16", True, (256, 8, 8), (256, 128, 4, 4), 2, 1),
        ("G convT 128->64 16->32", True, (128, 16, 16), (128, 64, 4, 4), 2, 1),
        ("G convT 64->3 32->64", True, (64, 32, 32), (64, 3, 4, 4), 2, 1),
        ("D conv 3->64 64->32", False, (3, 64, 64), (64, 3, 4, 4), 2, 1),
        ("D conv 64->128 32->16", False, (64, 32, 32), (128, 64, 4, 4), 2, 1),
        ("D conv 128->256 16->8", False, (128, 16, 16), (256, 128, 4, 4), 2, 1),
        ("D conv 256->512 8->4", False, (256, 8, 8), (512, 256, 4, 4), 2, 1),
        ("D conv 512->1 4->1", False, (512, 4, 4), (1, 512, 4, 4), 1, 0),
    ],
    "cdcgan28": [
        ("G convT 100->256 1->7 k7", True, (100, 1, 1), (100, 256, 7, 7), 1, 0),
        ("G convT 128->64 7->14", True, (128, 7, 7), (128, 64, 4, 4), 2, 1),
        ("G convT 64->1 14->28", True, (64, 14, 14), (64, 1, 4, 4), 2, 1),
        ("D conv 1->64 28->14", False, (1, 28, 28), (64, 1, 4, 4), 2, 1),
        ("D conv 64->128 14->7", False, (64, 14, 14), (128, 64, 4, 4), 2, 1),
    ],
}


def conv_layers(batch, iters, warmup):
    """Every pass of every convolution of CONV_LAYERS as autograd runs it: the forward
    (F.conv2d / F.conv_transpose2d) and aten.convolution_backward for the input gradient alone
    and for the weight gradient alone; median ms of `iters` runs after `warmup`, one line per
    pass in ganscope's format. The MAC count is the forward's."""
    with torch.no_grad():
        for model, layers in CONV_LAYERS.items():
            for name, transposed, xd, wd, s, p in layers:
                x, w = randn(batch, *xd), randn(*wd)
                if transposed:
                    fwd = lambda: F.conv_transpose2d(x, w, stride=s, padding=p)  # noqa: E731
                else:
                    fwd = lambda: F.conv2d(x, w, stride=s, padding=p)  # noqa: E731
                y = fwd()
                gy = randn(*y.shape)
                cols, img_c = (x.numel(), wd[1]) if transposed else (y.numel(), xd[0])
                gflop = 2 * cols * img_c * wd[2] * wd[3] / 1e9

                def bwd(mask):
                    return lambda: torch.ops.aten.convolution_backward(
                        gy, x, w, None, [s, s], [p, p], [1, 1], transposed, [0, 0], 1, mask)

                passes = [("forward", fwd), ("grad-input", bwd([True, False, False])),
                          ("grad-weight", bwd([False, True, False]))]
                for pass_name, f in passes:
                    for _ in range(warmup):
                        f()
                    ms = []
                    for _ in range(max(iters, 1)):
                        t = time.perf_counter()
                        f()
                        ms.append((time.perf_counter() - t) * 1e3)
                    ms.sort()
                    med = ms[len(ms) // 2]
                    print(f"layer {model} {name.replace(' ', '_')} {pass_name} ms={med:.3f} "
                          f"gflops={gflop / med * 1e3:.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int, help="default 64 (iclevr-sagan 16, as ganscope)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch_bench: --device cuda, but this PyTorch sees no CUDA device")
    global DEV
    DEV = device
    if device.type == "cuda" and os.environ.get("TORCH_CUDNN_BENCHMARK") == "1":
        # Not PyTorch's default: cuDNN times its algorithms on the first call of each shape
        # and keeps the fastest (an extra column, the best setting we know for PyTorch).
        torch.backends.cudnn.benchmark = True
    if a.model == "conv-layers":
        conv_layers(a.batch or 64, a.iters, a.warmup)
        return
    names = [a.model] if a.model else MODELS
    for n in names:
        if n not in WORKLOADS:
            print(f"torch_bench: model {n} not reproduced in PyTorch (skipped)")
    names = [n for n in names if n in WORKLOADS]
    threads = torch.get_num_threads()
    if device.type == "cpu":
        sg = sgemm_gflops(device)
        print(f"pytorch {torch.__version__}, cpu capability "
              f"{torch.backends.cpu.get_cpu_capability()}, {threads} threads, "
              f"sgemm 2048^3: {sg:.1f} GFLOP/s")
        print(f"bench sgemm n=2048 threads={threads} gflops={sg:.1f}")
    else:
        sg = sgemm_gflops(device, 8192)
        print(f"pytorch {torch.__version__}, device {torch.cuda.get_device_name(device)}, "
              f"f32 matmul 8192^3: {sg:.1f} GFLOP/s")
        print(f"bench sgemm n=8192 device={device} gflops={sg:.1f}")
    print(f"{'model':<16} {'batch':>5} {'ms median':>10} {'ms min/p25/p75/max':>21} "
          f"{'images/s':>9} {'GFLOP/iter':>10} {'GFLOP/s':>8} {'floor ms':>9} {'x floor':>8}")
    for n in names:
        batch = a.batch or DEFAULT_BATCH.get(n, 64)
        with torch.device(device):  # modules' parameters are made on the device
            w = WORKLOADS[n](batch)
        for _ in range(a.warmup):
            w.step()
        sync(device)
        ms = []
        for _ in range(max(a.iters, 1)):
            t = time.perf_counter()
            losses = w.step()
            sync(device)
            ms.append((time.perf_counter() - t) * 1e3)
            assert all(map(lambda v: v == v and abs(v) != float("inf"), losses)), losses
        ms.sort()
        med = quantile(ms, 0.5)
        ips = batch / (med / 1e3)
        gf = w.flops / (med / 1e3) / 1e9
        floor = w.flops / (sg * 1e9) * 1e3
        spread = "/".join(f"{quantile(ms, q):.0f}" for q in (0, 0.25, 0.75, 1))
        print(f"{n:<16} {batch:>5} {med:>10.1f} {spread:>21} {ips:>9.1f} {w.flops / 1e9:>10.1f} "
              f"{gf:>8.1f} {floor:>9.1f} {med / floor:>8.2f}")
        # Peak resident memory of the process so far (Linux reports KiB), as ganscope's line.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"bench model={n} batch={batch} ms_per_iter={med:.2f} images_per_s={ips:.2f} "
              f"gflops={gf:.2f} peak_rss_mib={rss:.0f}", flush=True)


if __name__ == "__main__":
    main()
