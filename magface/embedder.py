"""Inference: uint8 face crops -> unit features (identity) and magnitudes (quality).

The pixel convention is read from the checkpoint and applied here; nothing about preprocessing is assumed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from magface.checkpoint import build_backbone_checked, check_not_incomplete, load_model_file
from magface.preprocess import PixelConvention


class Embedder:
    def __init__(self, model: torch.nn.Module, preprocessing: PixelConvention, input_size: int, device=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.preprocessing = preprocessing
        self.input_size = input_size

    @classmethod
    def from_checkpoint(cls, path, device=None) -> "Embedder":
        """`path`: a checkpoint directory holding model.pt, or the model.pt file."""
        if str(path).startswith("s3://") and not str(path).endswith(".pt") or Path(path).is_dir():
            check_not_incomplete(path)  # a folder whose manifests say a copy was cut short
        ckpt = load_model_file(path)
        model = build_backbone_checked(ckpt, file=path)
        input_size = ckpt["backbone_kwargs"].get("input_size", 112)
        return cls(model, PixelConvention.from_dict(ckpt["preprocessing"]), input_size, device)

    @torch.no_grad()
    def raw_features(self, images) -> torch.Tensor:
        """uint8 N x H x W x 3 RGB (numpy or torch) -> un-normalised float32 features N x d on the CPU."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"Embedder: expected uint8 images N x {self.input_size} x {self.input_size} x 3 (RGB), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        x = self.preprocessing.apply(x.to(self.device))
        return self.model(x).float().cpu()

    def embed(self, images, flip: bool = False, batch_size: int = 256):
        """-> (unit features float32 N x d, magnitudes float32 N), numpy.

        flip=True fuses each image with its horizontal mirror by summing the two un-normalised features before
        normalising (the insightface/MagFace evaluation convention). The magnitude is always that of the
        un-flipped image's feature: it is the quality score the loss trained, and summing two features would
        change its scale.
        """
        feats, mags = [], []
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(np.asarray(images[start : start + batch_size]))
            f = self.raw_features(batch)
            mags.append(f.norm(dim=1))
            if flip:
                f = f + self.raw_features(batch.flip(2))
            feats.append(torch.nn.functional.normalize(f, dim=1))
        if not feats:
            raise ValueError("Embedder.embed: no images given")
        return torch.cat(feats).numpy(), torch.cat(mags).numpy()
