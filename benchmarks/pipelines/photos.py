"""Request payloads made of real photographs, nothing downloaded: the colour photos that ship in
scikit-image (``skimage.data``) and scikit-learn (``load_sample_images``), via ``flowkit.imagenet``.

Six photos are few, so a request set is made of *views*: the whole photo and seeded random crops
(40-100% of the shorter side, anywhere in the frame, some mirrored), each resized and centre-cropped
as torchvision's ImageNet transform does. Crops move MobileNetV2's confidence around, so the
cascade's large model is asked for some requests and not for others, as with real traffic.
"""

from __future__ import annotations

import functools

import numpy as np

VIEWS = 64   # distinct payloads per (size, seed); requests cycle over them


@functools.lru_cache(maxsize=8)
def views(size: int, seed: int = 0, count: int = VIEWS) -> tuple[bytes, ...]:
    """``count`` payloads of ``3 * size * size`` uint8 bytes (CHW, RGB)."""
    from flowkit.imagenet import photos, resize_crop

    rng = np.random.default_rng(seed)
    pics = photos()
    out = []
    for i in range(count):
        px = pics[i % len(pics)].pixels
        if i >= len(pics):   # the first view of each photo is the whole photo
            h, w = px.shape[:2]
            side = int(min(h, w) * rng.uniform(0.4, 1.0))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            px = px[top:top + side, left:left + side]
            if rng.random() < 0.5:
                px = px[:, ::-1]
        out.append(resize_crop(px, size).tobytes())
    return tuple(out)


def names(count: int = VIEWS) -> list[str]:
    """The photo each view comes from, in order."""
    from flowkit.imagenet import photos

    pics = photos()
    return [pics[i % len(pics)].name for i in range(count)]


def requests(size: int, n: int, seed: int = 0) -> list[dict]:
    """``n`` image requests cycling over ``views(size)``: ``{"img": <size x size RGB bytes>}``."""
    imgs = views(size, seed=seed)
    return [{"img": imgs[i % len(imgs)]} for i in range(n)]
