"""The pixel convention: how uint8 images become network input.

Mismatched preprocessing (RGB vs BGR, [0,1] vs [-1,1]) is the most common way a MagFace model silently
loses accuracy, so the convention is one named, serialisable object that travels with every checkpoint.
The data pipeline always carries RGB uint8 HxWx3; the convention is applied on the worker (GPU or CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PixelConvention:
    """x_in = (pixel[channel_order] - mean) / std, channels first."""

    channel_order: str = "RGB"  # order of channels the network sees: "RGB" or "BGR"
    mean: float = 127.5
    std: float = 127.5

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"PixelConvention.channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if not self.std > 0:
            raise ValueError(f"PixelConvention.std must be > 0, got {self.std!r}")

    @property
    def name(self) -> str:
        for known, conv in NAMED_CONVENTIONS.items():
            if conv == self:
                return known
        return f"{self.channel_order}(x-{self.mean:g})/{self.std:g}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PixelConvention":
        return cls(**d)

    @classmethod
    def named(cls, name: str) -> "PixelConvention":
        try:
            return NAMED_CONVENTIONS[name]
        except KeyError:
            raise ValueError(f"unknown pixel convention {name!r}; known: {sorted(NAMED_CONVENTIONS)}") from None

    def apply(self, images):
        """uint8 N x H x W x 3 RGB (torch tensor or numpy) -> float32 N x 3 x H x W, same library."""
        if isinstance(images, np.ndarray):
            x = images.astype(np.float32)
            if self.channel_order == "BGR":
                x = x[..., ::-1]
            x = (x - self.mean) / self.std
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        x = images  # a torch tensor
        if self.channel_order == "BGR":
            x = x.flip(-1)
        x = x.permute(0, 3, 1, 2).float()
        return x.sub_(self.mean).div_(self.std).contiguous()


NAMED_CONVENTIONS = {
    # insightface arcface_torch: RGB, (x/255 - 0.5) / 0.5
    "insightface": PixelConvention("RGB", 127.5, 127.5),
    # official MagFace repo: cv2 (BGR) images, ToTensor() only -> [0, 1]
    "magface_official": PixelConvention("BGR", 0.0, 255.0),
}
