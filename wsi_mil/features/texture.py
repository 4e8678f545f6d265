"""``texture``: a small, fixed, deterministic H&E encoder that needs no weights.

It measures what distinguishes tissue types at 20×, from RGB in [0, 1]:

* colour: mean and standard deviation of R, G, B, grey, and of the haematoxylin (H) and
  eosin (E) optical densities from Ruifrok–Johnston colour deconvolution (12 values);
* texture: band-pass energy of grey and H at four scales (1, 2, 4, 8 px) — how much
  each image differs from its 3×3 local mean after average-pooling (8 values);
* edges: mean Sobel gradient magnitude of grey and H (2 values);
* soft histograms (8 bins each) of grey level and of H density, on the image averaged
  over 2×2 pixels (16 values);
* the share of dark, nucleus-like pixels at three thresholds (3 values).

41 values in all, no learnt parameters: the same patch always gives the same vector on
any machine, and dense dark nuclei (tumour) separate from sparse ones (stroma, normal
tissue). It is for tests and the demo, not a substitute for a foundation model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


class TextureStats(nn.Module):
    """Colour/texture statistics of (B, 3, S, S) RGB batches in [0, 1] → (B, 41).

    Parameters
    ----------
    input_size : int
        Side of the (resized) patch; 224 like most encoders.
    """

    n_bins = 8
    scales = (1, 2, 4, 8)
    dark_thresholds = (0.35, 0.45, 0.55)

    def __init__(self, input_size: int = 224) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.register_buffer("hed_from_rgb", torch.linalg.inv(_RGB_FROM_HED))
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
        self.register_buffer("sobel", torch.stack([sobel, sobel.T])[:, None])  # (2, 1, 3, 3)
        self.register_buffer("grey_centres", torch.linspace(0.0, 1.0, self.n_bins))
        self.register_buffer("h_centres", torch.linspace(0.0, 1.4, self.n_bins))

    @property
    def dim(self) -> int:
        """Output width."""
        return 12 + 2 * len(self.scales) + 2 + 2 * self.n_bins + len(self.dark_thresholds)

    @staticmethod
    def _soft_hist(v: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        # On a 2×2-averaged image: a quarter of the cost, the same distribution at this scale.
        v = F.avg_pool2d(v, 2)  # (B, 1, S/2, S/2)
        scaled = centres / (centres[1] - centres[0])
        z = v.flatten(1)[:, :, None] / (centres[1] - centres[0]) - scaled  # (B, P, K)
        w = torch.exp(-0.5 * z * z)  # (B, P, K)
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
        return w.mean(1)  # (B, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Statistics of ``x`` (B, 3, S, S), float in [0, 1]."""
        x = x.float().contiguous()
        od = -torch.log(x.clamp_min(1.0 / 255.0))  # (B, 3, S, S) optical density
        hed = torch.einsum("bchw,cd->bdhw", od, self.hed_from_rgb)  # (B, 3, S, S)
        grey = x.mean(1, keepdim=True)  # (B, 1, S, S)
        h = hed[:, :1]
        chans = torch.cat([x, grey, h, hed[:, 1:2]], 1)  # (B, 6, S, S)
        feats: list[Any] = [chans.mean((2, 3)), chans.std((2, 3))]
        gh = torch.cat([grey, h], 1)  # (B, 2, S, S)
        for k in self.scales:
            p = F.avg_pool2d(gh, k) if k > 1 else gh
            local = F.avg_pool2d(F.pad(p, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
            feats.append((p - local).abs().mean((2, 3)))  # (B, 2)
        g = F.conv2d(gh.reshape(-1, 1, *gh.shape[2:]), self.sobel)  # (2B, 2, S-2, S-2)
        feats.append(g.pow(2).sum(1).sqrt().mean((1, 2)).reshape(-1, 2))  # (B, 2)
        feats.append(self._soft_hist(grey, self.grey_centres))
        feats.append(self._soft_hist(h, self.h_centres))
        feats.append(
            torch.stack(
                [torch.sigmoid((t - grey) / 0.03).mean((1, 2, 3)) for t in self.dark_thresholds], 1
            )
        )  # (B, 3)
        return torch.cat(feats, 1)
