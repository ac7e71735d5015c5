"""The Inception-v3 feature network of FID (Heusel et al. 2017), for numbers comparable with papers.

The weights are TensorFlow's ``inception-2015-12-05`` graph ported to PyTorch by pytorch-fid
(``pt_inception-2015-12-05-6726825d.pth``, 95,628,359 bytes, sha256 below; torch-fidelity ships
the same bytes as ``weights-inception-2015-12-05-6726825d.pth``). They are found in, in order:
an explicit path; ``<data_dir>/vaelab-features/``; torch hub's checkpoint folder (where
pytorch-fid caches them); else downloaded (unless offline) and sha256-verified.

The network is written here from the Inception-v3 architecture (Szegedy et al. 2016) with the
four differences of the TF 2015 graph that FID depends on: average pools that exclude padding
in the A, C and first E blocks, a max pool in the last E block's pool branch, 1008 classes,
and batch-norm eps 1e-3. Inputs in [0, 1] are resized to 299x299 (bilinear), scaled to
[-1, 1], grey images repeated to RGB; the features are the 2048-d global average pool.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
ALT_NAMES = ("weights-inception-2015-12-05-6726825d.pth",)  # torch-fidelity's copy
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
)
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_SIZE = 95_628_359


class Conv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU: the unit every Inception block is built of."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # The TF graph's 3x3 average pools divide by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class BlockB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with expanded 1x3/3x1 branches; ``max_pool`` selects the TF graph's pool branch
    (average pool without padding in Mixed_7b, max pool in Mixed_7c)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in TF's 2015-12-05 graph, up to the 2048-d pool3 features.

    Module names follow the ported state dict (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b...``),
    so pytorch-fid's weights file loads directly; its ``fc`` (1008 classes) is not used.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1], C = 1 or 3 -> (B, 2048)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"Inception takes 1- or 3-channel images, got {x.shape[1]} channels")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def candidate_paths(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the weights are looked for, in order."""
    from vaelab.data.download import resolve_data_dir

    folders = [
        resolve_data_dir(data_dir) / "vaelab-features",
        Path(torch.hub.get_dir()) / "checkpoints",
    ]
    return [f / name for f in folders for name in (WEIGHTS_NAME, *ALT_NAMES)]


def find_weights(
    path: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = False,
) -> Path:
    """The verified weights file: ``path``, else the first cached copy, else a download.

    Raises ``FileNotFoundError`` naming every place looked at, the URL and the sha256 when the
    file is missing and cannot be downloaded, and ``ValueError`` for a file with another sha256.
    """
    from vaelab.data.download import DownloadError, download_file, file_digests, offline

    if path is not None:
        found = Path(path).expanduser()
        if not found.is_file():
            raise FileNotFoundError(f"Inception weights {found} do not exist")
    else:
        found = next((p for p in candidate_paths(data_dir) if p.is_file()), None)
    if found is None:
        dest = candidate_paths(data_dir)[0]
        looked = "\n  ".join(str(p) for p in candidate_paths(data_dir))
        if not download or offline():
            raise FileNotFoundError(
                f"FID needs the Inception weights {WEIGHTS_NAME} (sha256 {WEIGHTS_SHA256}), not found "
                f"in:\n  {looked}\nDownload {WEIGHTS_URL} to {dest}, or use the offline "
                "'lenet' feature net (FD-LeNet)."
            )
        try:
            found = download_file(
                WEIGHTS_URL, dest, f"sha256:{WEIGHTS_SHA256}", size=WEIGHTS_SIZE, progress=progress
            )
        except DownloadError as exc:
            raise FileNotFoundError(
                f"FID needs the Inception weights {WEIGHTS_NAME}; looked in:\n  {looked}\n"
                f"and the download failed: {exc}"
            ) from exc
    got = file_digests(found, ["sha256"])["sha256"]
    if got != WEIGHTS_SHA256:
        raise ValueError(
            f"{found} has sha256 {got}, expected {WEIGHTS_SHA256} ({WEIGHTS_NAME}); FID with other "
            "weights would not be comparable with published numbers"
        )
    return found


def load_fid_inception(path: str | os.PathLike) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load a pytorch-fid-format state dict from ``path``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict of tensors")
    net = FIDInceptionV3()
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.startswith(("fc.", "AuxLogits."))]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the FID Inception-v3: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    return net.eval()


def inception_feature_net(
    path: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    download: bool = True,
    progress: bool = False,
):
    """The FID :class:`~vaelab.metrics.features.FeatureNet` (2048-d Inception pool3 features)."""
    from vaelab.metrics.features import FeatureNet

    weights = find_weights(path, data_dir=data_dir, download=download, progress=progress)
    net = load_fid_inception(weights).to(device)
    desc = (
        f"2048-d pool3 features of the FID Inception-v3 ({WEIGHTS_NAME}, sha256 "
        f"{WEIGHTS_SHA256[:12]}), images resized to 299x299 bilinear, grey repeated to RGB"
    )
    meta = {"feature_net": "inception", "file": str(weights), "sha256": WEIGHTS_SHA256}
    return FeatureNet(net, key="fid", display="FID", description=desc, meta=meta, comparable=True)
