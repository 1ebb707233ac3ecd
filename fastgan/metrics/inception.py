"""The InceptionV3 network of FID, KID and IS, in plain torch, from a local weights file.

This is the network of TensorFlow's inception-2015-12-05 graph that the FID paper used, as
pytorch-fid and torch-fidelity port it: torchvision's InceptionV3 layout (so the state_dict keys
are torchvision's), average pools that ignore padding, a max pool in the last block, and a
1008-way classifier. Input handling follows torch-fidelity's "inception-v3-compat", which
matches the TensorFlow graph: uint8 images, TensorFlow 1.x bilinear resize to 299x299 (no
half-pixel offset), (x - 128) / 128. Outputs: 2048 pool features (FID, KID) and the logits
without the classifier bias over 1008 classes (IS, as in the original Inception Score code).

The weights are read from a file, never downloaded: FASTGAN never reaches the network.
torchvision is not used because its wheels pin one torch version each and do not import beside
the CPU torch wheel CI installs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastgan.errors import UserError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_BYTES = 95_628_359
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
ENV = "FASTGAN_INCEPTION"
# Test hook, not a user option: FASTGAN_TEST_FEATURE_NET=tiny swaps in a small random network
# so tests can run FID/KID/IS end to end without the 95 MB file. Its numbers mean nothing.
TEST_ENV = "FASTGAN_TEST_FEATURE_NET"


class InceptionWeightsError(UserError, RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# the network

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)   # TF ignores the padding


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """pool="avg" in Mixed_7b; "max" in Mixed_7c, where the TF graph has a max pool."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def resize_like_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x's resize_bilinear(align_corners=False): source coordinate
    = output coordinate x (in / out), no half-pixel offset (torch-fidelity's "slow", exact method)."""
    def axis(n_in):
        scale = torch.tensor(n_in / size, dtype=torch.float32)       # float32, as TF computes it
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = pos.long()
        return lo, (lo + 1).clamp(max=n_in - 1), pos - lo.float()
    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bottom = x[:, :, ylo], x[:, :, yhi]
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * dx
    return top + (bottom - top) * dy[:, None]


class FIDInception(nn.Module):
    """uint8 images (N, 3, H, W) -> (pool features (N, 2048), unbiased logits (N, 1008))."""

    name = "inception-2015-12-05"
    SIZE = 299

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = resize_like_tf1(images.float(), self.SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        feats = x.mean(dim=(2, 3))
        return feats, feats @ self.fc.weight.T      # no bias: the logits IS was defined on


class TinyFeatureNet(nn.Module):
    """Stand-in for FIDInception in tests (FASTGAN_TEST_FEATURE_NET=tiny): fixed random weights,
    64 features, 10 logits. Same contract, so every path after the network is exercised."""

    name = "tiny-random"

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 64, 4, stride=4)
        self.fc = nn.Linear(64, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def forward(self, images):
        x = images.float() / 127.5 - 1
        feats = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return feats, self.fc(feats)


# ---------------------------------------------------------------------------------------------
# finding and checking the weights file

def _candidates(path, cfg_path, cache_dir) -> list[tuple[str, Path]]:
    """(where it came from, path) in the order they are tried."""
    out = []
    if path:
        out.append(("--inception-weights", Path(path)))
    if os.environ.get(ENV):
        out.append((f"${ENV}", Path(os.environ[ENV])))
    if cfg_path:
        out.append(("eval.inception_weights", Path(cfg_path)))
    if out:                        # named explicitly: that file or an error, never a fallback
        return [(src, p.expanduser()) for src, p in out]
    hub = Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser() / "hub" / "checkpoints"
    return [("default", Path(cache_dir).expanduser() / WEIGHTS_NAME),
            ("pytorch-fid's download", hub / WEIGHTS_NAME),
            ("torch-fidelity's download", hub / "weights-inception-2015-12-05-6726825d.pth")]


def default_path(cache_dir: str = "~/.cache/fastgan") -> Path:
    return Path(cache_dir).expanduser() / WEIGHTS_NAME


def find_weights(path: str | None = None, cfg_path: str | None = None,
                 cache_dir: str = "~/.cache/fastgan") -> Path:
    """The weights file: --inception-weights, else $FASTGAN_INCEPTION, else eval.inception_weights,
    else the default place and the places pytorch-fid / torch-fidelity download to."""
    tried = _candidates(path, cfg_path, cache_dir)
    for _, p in tried:
        if p.is_file():
            return p
    lines = "\n".join(f"  {src}: {p}" for src, p in tried)
    raise InceptionWeightsError(
        f"FID, KID and IS need the Inception weights file {WEIGHTS_NAME} "
        f"({WEIGHTS_BYTES:,} bytes, sha256 {WEIGHTS_SHA256}); fastgan never downloads it. Looked in:\n"
        f"{lines}\n"
        f"Get it on a machine with internet ({WEIGHTS_URL}; pytorch-fid's and torch-fidelity's "
        f"copies are the same file), then put it at {default_path(cache_dir)}, or pass "
        f"--inception-weights PATH, or set {ENV}=PATH. Without it, use --metrics swd,ms_ssim.")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_inception(path: Path, expected_sha256: str = WEIGHTS_SHA256) -> FIDInception:
    """FIDInception with the weights of `path`, after checking its sha256."""
    digest = sha256(path)
    if digest != expected_sha256:
        raise InceptionWeightsError(
            f"{path} is not {WEIGHTS_NAME}: its sha256 is {digest}, expected {expected_sha256} "
            f"({WEIGHTS_BYTES:,} bytes). A different Inception (e.g. torchvision's) gives different, "
            f"incomparable FID; get the right file from {WEIGHTS_URL}.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = FIDInception()
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]   # absent in old files
    if missing or unexpected:
        raise InceptionWeightsError(f"{path}: keys do not fit FIDInception; missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}")
    return net.eval().requires_grad_(False)


def feature_net(path: str | None = None, cfg_path: str | None = None,
                cache_dir: str = "~/.cache/fastgan") -> nn.Module:
    """The network FID/KID/IS run on (CPU, eval mode): the checked Inception, or the test stand-in."""
    if os.environ.get(TEST_ENV) == "tiny":
        return TinyFeatureNet().eval().requires_grad_(False)
    return load_inception(find_weights(path, cfg_path, cache_dir))
