"""Image encoder: torchvision ResNet (18 or 50) penultimate features + hand-crafted colour/texture features.

Preprocessing is the standard ImageNet one: resize the short side to size*256/224, center-crop `image_size`,
normalise with the ImageNet mean/std. Weights come from `features.image.weights_path` (a torchvision
state_dict, `.safetensors` or a torch file loaded with weights_only=True).

Without weights the CNN is randomly initialised with a fixed seed (version says `random-init`) and a loud
warning is logged. Its features are not semantic, so the hand-crafted block is what carries the visual
signal then. The block (`features.image.handcrafted`, on by default) is ALWAYS appended when enabled, with
or without weights, so the embedding dim does not depend on whether weights exist and the cheap colour cue
stays available to the ranker:
  - colour: sqrt-normalised joint HSV histogram (8 hue x 3 sat x 3 value = 72 bins) + RGB mean and std (6);
  - texture: Sobel gradient-orientation energy (8 bins) and mean gradient magnitude at 2 scales (18).
Both are computed on the cropped image resized to 64x64. Each block (CNN, colour, texture) is L2-normalised
and the concatenation is L2-normalised again, so the blocks weigh equally in cosine similarity.
"""
from __future__ import annotations

import io
import math
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from mmrank.config import FeaturesConf
from mmrank.encoders.base import Encoder, ItemError, file_fingerprint, load_state_dict, resolve, warn_random_init
from mmrank.registry import ENCODERS

CNN_DIMS = {"resnet18": 512, "resnet50": 2048}
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
HC_SIZE = 64
HUE_BINS, SAT_BINS, VAL_BINS = 8, 3, 3
ORIENT_BINS, SCALES = 8, 2
COLOUR_DIM = HUE_BINS * SAT_BINS * VAL_BINS + 6
TEXTURE_DIM = SCALES * (ORIENT_BINS + 1)
HANDCRAFTED_DIM = COLOUR_DIM + TEXTURE_DIM
_EPS = 1e-8


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B,3,H,W] in [0,1] -> hue, saturation, value, each [B,H,W] in [0,1]."""
    r, g, b = x.unbind(1)
    maxc, argmax = x.max(1)
    delta = maxc - x.min(1).values
    safe = delta.clamp_min(_EPS)
    h = torch.where(argmax == 0, ((g - b) / safe) % 6, torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > _EPS, h / 6.0, torch.zeros_like(h))
    s = torch.where(maxc > _EPS, delta / maxc.clamp_min(_EPS), torch.zeros_like(maxc))
    return h, s, maxc


def _hist(idx: torch.Tensor, bins: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row histogram of integer bin ids [B, N] (optionally weighted), divided by N."""
    w = torch.ones_like(idx, dtype=torch.float32) if weight is None else weight.float()
    return torch.zeros(idx.shape[0], bins, device=idx.device).scatter_add_(1, idx, w) / idx.shape[1]


def colour_features(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> [B, COLOUR_DIM]: sqrt joint HSV histogram + RGB mean/std."""
    h, s, v = _rgb_to_hsv(x)
    hb = (h * HUE_BINS).long().clamp(0, HUE_BINS - 1)
    sb = (s * SAT_BINS).long().clamp(0, SAT_BINS - 1)
    vb = (v * VAL_BINS).long().clamp(0, VAL_BINS - 1)
    idx = ((hb * SAT_BINS + sb) * VAL_BINS + vb).flatten(1)
    hist = _hist(idx, HUE_BINS * SAT_BINS * VAL_BINS).sqrt()
    return torch.cat([hist, x.mean((2, 3)), x.std((2, 3))], 1)


def texture_features(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> [B, TEXTURE_DIM]: Sobel orientation energy histogram + mean magnitude per scale."""
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device)
    kernel = torch.stack([kx, kx.t()]).unsqueeze(1)  # [2,1,3,3]
    feats = []
    for _ in range(SCALES):
        g = F.conv2d(gray, kernel, padding=1)
        mag = g.pow(2).sum(1).sqrt().flatten(1)
        ang = torch.atan2(g[:, 1], g[:, 0]).flatten(1) % math.pi
        ob = (ang / math.pi * ORIENT_BINS).long().clamp(0, ORIENT_BINS - 1)
        feats += [_hist(ob, ORIENT_BINS, mag), mag.mean(1, keepdim=True)]
        gray = F.avg_pool2d(gray, 2)
    return torch.cat(feats, 1)


def handcrafted_features(x: torch.Tensor) -> list[torch.Tensor]:
    """The colour and texture blocks of [B,3,H,W] images in [0,1] (computed at HC_SIZE x HC_SIZE)."""
    small = F.interpolate(x, size=(HC_SIZE, HC_SIZE), mode="area")
    return [colour_features(small), texture_features(small)]


@ENCODERS["image"].register(*CNN_DIMS)
class ImageEncoder(Encoder):
    """Inputs are raw image file bytes (JPEG/PNG/...); undecodable bytes are item errors."""

    modality = "image"

    def __init__(self, name: str, features: FeaturesConf):
        c = features.image
        super().__init__(name, features, c.batch_size)
        self.size, self.seed, self.handcrafted = c.image_size, c.seed, c.handcrafted
        self.weights = resolve(c.weights_path)
        if self.weights is not None and not self.weights.exists():
            raise FileNotFoundError(f"features.image.weights_path: {self.weights} does not exist")
        wid = file_fingerprint(self.weights) if self.weights else f"random-init-seed{self.seed}"
        self.version = f"{name}-{wid}-{self.size}px" + ("-hc1" if self.handcrafted else "")
        self.dim = CNN_DIMS[name] + (HANDCRAFTED_DIM if self.handcrafted else 0)
        if self.weights is None:
            warn_random_init(f"image encoder {name}", "features.image.weights_path")
        from torchvision import transforms as T

        self._prep = T.Compose([T.Resize(round(self.size * 256 / 224)), T.CenterCrop(self.size), T.PILToTensor()])

    def _load(self) -> None:
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = getattr(torchvision.models, self.name)(weights=None)
        if self.weights is not None:
            model.load_state_dict(load_state_dict(self.weights))
        model.fc = torch.nn.Identity()
        self.model = model.eval().to(self.device)

    def decode(self, item: Any) -> torch.Tensor:
        if item is None or len(item) == 0:
            raise ItemError("empty image (0 bytes)")
        try:
            with Image.open(io.BytesIO(bytes(item))) as im:
                im.load()
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ItemError(f"corrupt image: {type(e).__name__}: {e}") from None
        return self._prep(rgb)  # uint8 [3, size, size]

    def _forward(self, batch: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(batch).to(self.device, non_blocking=True).float().div_(255)
        blocks = [self.model((x - _MEAN.to(x.device)) / _STD.to(x.device)).float()]
        if self.handcrafted:
            with torch.autocast(self.device.type, enabled=False):
                blocks += handcrafted_features(x)
        return F.normalize(torch.cat([F.normalize(b, dim=1) for b in blocks], 1), dim=1)
