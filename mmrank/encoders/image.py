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

Decoding (`features.image.decoder`): `pil` decodes and resizes each image on the CPU (the default on CPU);
`torchvision` (the default on a GPU) sends complete RGB/greyscale JPEGs as raw bytes to the model's device,
decodes them there as one batch (`torchvision.io.decode_jpeg(device=...)`: nvJPEG on a GPU) and resizes and
crops them there (antialiased bilinear, like PIL's); other formats, and JPEGs the batch decoder rejects, go
through PIL. CPU-decoded pixels are stacked in pinned host memory and copied asynchronously. The two decoders
give close, not bit-identical, pixels (cosine of embeddings ~0.99+); like `features.precision`, the decoder
is an execution choice and not part of the encoder version.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from mmrank.config import FeaturesConf
from mmrank.encoders.base import (BadItems, Encoder, ItemError, file_fingerprint, load_state_dict, resolve,
                                  warn_random_init)
from mmrank.encoders.device import staged
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
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"


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


@dataclass
class Jpeg:
    """A complete RGB or greyscale JPEG left undecoded for the batch decoder (`raw`: its bytes as uint8)."""

    raw: torch.Tensor


@dataclass
class ImageBatch:
    """`_collate`'s output: CPU-decoded pixels (uint8 [k, 3, S, S], pinned when headed for a GPU) and raw JPEGs,
    with their positions in the batch."""

    n: int
    pixel_pos: list[int] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    jpeg_pos: list[int] = field(default_factory=list)
    jpegs: list[torch.Tensor] = field(default_factory=list)


def batch_decodable(data: bytes) -> bool:
    """A JPEG the batch decoder should take: starts with SOI, ends with EOI (a truncated file goes to PIL, which
    rejects it), and its header says RGB or greyscale (CMYK and others go to PIL)."""
    if not (data.startswith(_JPEG_SOI) and data.endswith(_JPEG_EOI)):
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            return im.format == "JPEG" and im.mode in ("RGB", "L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


@ENCODERS["image"].register(*CNN_DIMS)
class ImageEncoder(Encoder):
    """Inputs are raw image file bytes (JPEG/PNG/...); undecodable bytes are item errors."""

    modality = "image"

    def __init__(self, name: str, features: FeaturesConf, device: torch.device | None = None):
        c = features.image
        super().__init__(name, features, c.batch_size, device)
        self.size, self.seed, self.handcrafted, self.decoder = c.image_size, c.seed, c.handcrafted, c.decoder
        self.resize_to = round(self.size * 256 / 224)
        self.weights = resolve(c.weights_path)
        if self.weights is not None and not self.weights.exists():
            raise FileNotFoundError(f"features.image.weights_path: {self.weights} does not exist")
        wid = file_fingerprint(self.weights) if self.weights else f"random-init-seed{self.seed}"
        self.version = f"{name}-{wid}-{self.size}px" + ("-hc1" if self.handcrafted else "")
        self.dim = CNN_DIMS[name] + (HANDCRAFTED_DIM if self.handcrafted else 0)
        if self.weights is None:
            warn_random_init(f"image encoder {name}", "features.image.weights_path")
        from torchvision import transforms as T

        self._prep = T.Compose([T.Resize(self.resize_to), T.CenterCrop(self.size), T.PILToTensor()])

    @property
    def batch_decode(self) -> bool:
        """Whether JPEGs are decoded as a batch on the model's device (`features.image.decoder`)."""
        return self.decoder == "torchvision" or (
            self.decoder == "auto" and self.device is not None and self.device.type == "cuda")

    def _load(self) -> None:
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = getattr(torchvision.models, self.name)(weights=None)
        if self.weights is not None:
            model.load_state_dict(load_state_dict(self.weights))
        model.fc = torch.nn.Identity()
        self.model = model.eval().to(self.device)
        if self.device.type == "cuda":  # NHWC convolutions on tensor cores; fixed input shapes: autotune them
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True

    def decode(self, item: Any) -> torch.Tensor | Jpeg:
        if item is None or len(item) == 0:
            raise ItemError("empty image (0 bytes)")
        data = bytes(item)
        if self.batch_decode and batch_decodable(data):
            return Jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return self._pil_decode(data)

    def _pil_decode(self, data: bytes) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ItemError(f"corrupt image: {type(e).__name__}: {e}") from None
        return self._prep(rgb)  # uint8 [3, size, size]

    def _collate(self, batch: list[torch.Tensor | Jpeg]) -> ImageBatch:
        out = ImageBatch(len(batch))
        for j, d in enumerate(batch):
            if isinstance(d, Jpeg):
                out.jpeg_pos.append(j)
                out.jpegs.append(d.raw)
            else:
                out.pixel_pos.append(j)
        if out.pixel_pos:
            out.pixels = staged(torch.stack([batch[j] for j in out.pixel_pos]), self.device)
        return out

    def _resize_crop(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 [3, H, W] images on the device -> uint8 [n, 3, S, S] (short side to resize_to, centre crop S);
        images of one shape are resized together."""
        from torchvision.transforms.v2 import functional as TF

        out = torch.empty((len(images), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        shapes: dict[tuple[int, ...], list[int]] = {}
        for j, im in enumerate(images):
            shapes.setdefault(tuple(im.shape), []).append(j)
        for idx in shapes.values():
            x = torch.stack([images[j] for j in idx])
            x = TF.resize(x, [self.resize_to], antialias=True)
            out[idx] = TF.center_crop(x, [self.size, self.size])
        return out

    def _decode_jpegs(self, jpegs: list[torch.Tensor]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor],
                                                                dict[int, str]]:
        """Batch-decode raw JPEGs on the device; when the batch call fails, each JPEG alone, then through PIL.
        Returns (full-size device-decoded images, PIL-decoded already resized and cropped, failures) by position."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return dict(enumerate(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))), {}, {}
        except RuntimeError:
            pass
        full: dict[int, torch.Tensor] = {}
        prepped: dict[int, torch.Tensor] = {}
        failed: dict[int, str] = {}
        for j, raw in enumerate(jpegs):
            try:
                full[j] = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
                continue
            except RuntimeError:
                pass
            try:
                prepped[j] = self._pil_decode(raw.numpy().tobytes())
            except ItemError as e:
                failed[j] = str(e)
        return full, prepped, failed

    def _pixels(self, batch: ImageBatch) -> torch.Tensor:
        """uint8 [n, 3, S, S] on the device, in batch order; `BadItems` for JPEGs no decoder accepts."""
        if not batch.jpegs:
            return batch.pixels.to(self.device, non_blocking=True)
        full, prepped, failed = self._decode_jpegs(batch.jpegs)
        if failed:
            raise BadItems({batch.jpeg_pos[j]: reason for j, reason in failed.items()})
        x = torch.empty((batch.n, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        if batch.pixels is not None:
            x[batch.pixel_pos] = batch.pixels.to(self.device, non_blocking=True)
        if full:
            x[[batch.jpeg_pos[j] for j in full]] = self._resize_crop([full[j] for j in full])
        if prepped:
            x[[batch.jpeg_pos[j] for j in prepped]] = torch.stack(list(prepped.values())).to(self.device)
        return x

    def _forward(self, batch: ImageBatch) -> torch.Tensor:
        x = self._pixels(batch).float().div_(255)
        normed = (x - _MEAN.to(x.device)) / _STD.to(x.device)
        if self.device.type == "cuda":
            normed = normed.contiguous(memory_format=torch.channels_last)
        blocks = [self.model(normed).float()]
        if self.handcrafted:
            with torch.autocast(self.device.type, enabled=False):
                blocks += handcrafted_features(x)
        return F.normalize(torch.cat([F.normalize(b, dim=1) for b in blocks], 1), dim=1)
