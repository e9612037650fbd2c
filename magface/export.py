"""ONNX export of a checkpoint: uint8 N x H x W x 3 RGB in, (unit features N x d, magnitudes N) out.

The checkpoint's pixel convention is baked into the graph (and recorded in the model's metadata), so an ONNX
consumer feeds raw RGB crops exactly as the Embedder does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from magface.data.storage import atomic_write
from magface.embedder import Embedder
from magface.preprocess import PixelConvention


class _InferenceGraph(nn.Module):
    def __init__(self, backbone: nn.Module, preprocessing: PixelConvention):
        super().__init__()
        self.backbone, self.preprocessing = backbone, preprocessing

    def forward(self, images):
        f = self.backbone(self.preprocessing.apply(images))
        magnitude = f.norm(dim=1)
        return f / magnitude.clamp_min(1e-12)[:, None], magnitude


def export_onnx(checkpoint, out_path, opset: int = 17, dynamic_batch: bool = True) -> str:
    """Write `out_path` (a local path or s3:// URI, atomically) from a checkpoint directory or model.pt."""
    if opset < 17:
        raise ValueError(f"export_onnx: opset must be >= 17, got {opset}")
    import onnx

    embedder = Embedder.from_checkpoint(checkpoint, device="cpu")
    graph = _InferenceGraph(embedder.model, embedder.preprocessing).eval()
    size = embedder.input_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    axes = {"images": {0: "batch"}, "features": {0: "batch"}, "magnitudes": {0: "batch"}} if dynamic_batch else None
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / "model.onnx"
        # The TorchScript exporter: the dynamo one needs onnxscript, which is not a dependency.
        torch.onnx.export(
            graph, (example,), str(traced), input_names=["images"], output_names=["features", "magnitudes"],
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )
        model = onnx.load(str(traced))
    meta = {"preprocessing": json.dumps(embedder.preprocessing.to_dict()), "input": f"uint8 N x {size} x {size} x 3 RGB"}
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    with atomic_write(out_path) as f:
        f.write(model.SerializeToString())
    return str(out_path)
