"""Import the iResNet weights users already hold into a project checkpoint (`model.pt`).

Sources (docs/conventions.md, "Checkpoints users hold"):
- official MagFace (`--from magface`): `torch.save({"epoch", "arch", "state_dict", ...})` of a DataParallel
  model whose backbone is `module.features.<key>` and whose MagLinear classifier is `module.fc.weight`
  (dropped here). BN eps 2e-5, feature BatchNorm scale trained, input BGR x/255, Dropout2d(0.4).
- arcface_torch (`--from insightface`): `backbone.pth`, the plain backbone state dict. BN eps 1e-5, feature
  scale frozen at 1, input RGB (x - 127.5)/127.5, dropout 0 by default.
Both name the tensors `conv1, bn1, prelu, layer<L>.<i>.{bn1, conv1, bn2, prelu, conv2, bn3, downsample.0/1},
bn2, fc, features`: the same tensors, in the same order, as `magface.models.iresnet` under other names, so a
renaming reproduces their embeddings exactly. Accepted containers: a plain state dict, a dict holding
`state_dict`, keys with `module.` and/or `features.` prefixes. Anything else is refused with the file and the
first key that does not fit. Files load with `weights_only=True`: no code in them runs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from magface.models.iresnet import STAGES

SOURCES = {
    # pixel convention, BN eps, trainable feature scale, dropout, the loss kind the weights were trained with
    "magface": {"convention": "magface_official", "bn_eps": 2e-5, "trainable_feature_scale": True,
                "dropout": 0.4, "loss": "magface"},
    "insightface": {"convention": "insightface", "bn_eps": 1e-5, "trainable_feature_scale": False,
                    "dropout": 0.0, "loss": "arcface"},
}
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_BLOCK = {"bn1": "body.0", "conv1": "body.1", "bn2": "body.2", "prelu": "body.3", "conv2": "body.4",
          "bn3": "body.5", "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}
_TOP = {"conv1": "stem.0", "bn1": "stem.1", "prelu": "stem.2", "bn2": "head.bn", "fc": "head.fc",
        "features": "head.features"}
_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.(bn1|conv1|bn2|prelu|conv2|bn3|downsample\.[01])\.(\w+)$")
_TOP_KEY = re.compile(r"(conv1|bn1|prelu|bn2|fc|features)\.(\w+)$")


class WeightsImportError(ValueError):
    """A weights file this importer cannot read; the message names the file and the key."""


def project_key(key: str) -> str | None:
    """The project's name for a reference iResNet key (None if it is not one)."""
    m = _BLOCK_KEY.match(key)
    if m:
        layer, block, part, leaf = m.groups()
        return f"stages.{int(layer) - 1}.{int(block)}.{_BLOCK[part]}.{leaf}"
    m = _TOP_KEY.match(key)
    if m:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    return None


def _state_dict_of(payload, file) -> dict:
    """The tensor dict inside what torch.load returned: the payload itself or its `state_dict`."""
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload:
        raise WeightsImportError(f"{file}: expected a state dict (or a dict holding 'state_dict'), got "
                           f"{type(payload).__name__}")
    for k, v in payload.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise WeightsImportError(f"{file}: entry {k!r} is a {type(v).__name__}, not a tensor; expected an iResNet "
                               "state dict (official MagFace checkpoint or arcface_torch backbone.pth)")
    return payload


def _strip_prefixes(state: dict, file) -> dict:
    """Drop `module.` (DataParallel) and the MagFace builder's `features.` prefix; drop its classifier."""
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "features.conv1.weight" in state:  # MagFace's SoftmaxBuilder: backbone under features., MagLinear as fc
        state = {k[len("features."):]: v for k, v in state.items() if k != "fc.weight"}
    return state


def infer_arch(state: dict) -> str | None:
    """The iResNet depth whose block counts the keys show (None if no known one)."""
    counts = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    return next((name for name, layers in STAGES.items() if tuple(layers) == tuple(counts)), None)


def convert_state_dict(state: dict, arch: str, file="weights") -> tuple[dict, dict]:
    """(project state dict, backbone kwargs minus the source's settings) for a reference iResNet state dict
    (prefixes already stripped). Raises WeightsImportError naming the first unexpected or missing key."""
    from magface.models import get_backbone

    out = {}
    for k, v in state.items():
        pk = project_key(k)
        if pk is None:
            raise WeightsImportError(f"{file}: unexpected key {k!r}: not an iResNet tensor (expected conv1, bn1, prelu, "
                               "layer<L>.<i>.{bn1,conv1,bn2,prelu,conv2,bn3,downsample.0/1}, bn2, fc, features)")
        out[pk] = v
    emb, fc_in = out["head.features.weight"].shape[0] if "head.features.weight" in out else None, None
    if "head.fc.weight" in out:
        fc_in = out["head.fc.weight"].shape[1]
    if emb is None or fc_in is None:
        raise WeightsImportError(f"{file}: no {'features.weight' if emb is None else 'fc.weight'} tensor; not a full "
                           "iResNet backbone")
    side = math.isqrt(fc_in // 512)
    if side * side * 512 != fc_in:
        raise WeightsImportError(f"{file}: fc.weight has {fc_in} inputs, not 512 x s x s")
    kwargs = {"embedding_size": int(emb), "input_size": int(16 * side)}
    with torch.device("meta"):
        expected = get_backbone(arch, **kwargs).state_dict()
    for key, ref in expected.items():
        if key not in out:
            if key.endswith("num_batches_tracked"):  # written by PyTorch >= 0.4.1 only; unused at inference
                out[key] = torch.zeros((), dtype=torch.long)
                continue
            found = infer_arch(state)
            raise WeightsImportError(f"{file}: no tensor for {key!r} of {arch}"
                               + (f"; the file holds an {found}: pass --arch {found}" if found and found != arch
                                  else ""))
        if tuple(out[key].shape) != tuple(ref.shape):
            raise WeightsImportError(f"{file}: {key} is {tuple(out[key].shape)}, {arch} needs {tuple(ref.shape)}")
    extra = sorted(set(out) - set(expected))
    if extra:
        found = infer_arch(state)
        raise WeightsImportError(f"{file}: unexpected tensor {extra[0]!r} for {arch}"
                           + (f"; the file holds an {found}: pass --arch {found}" if found and found != arch else ""))
    return {k: out[k] for k in expected}, kwargs


def import_weights(src, source: str, out_dir, arch: str | None = None) -> Path:
    """Convert `src` (a MagFace or arcface_torch checkpoint) into `<out_dir>/model.pt`; returns its path.

    The checkpoint records the source's pixel convention, BN eps and feature-scale setting, so
    `Embedder.from_checkpoint`, `pipelines/evaluate.py --checkpoint` and `model.init_from` use it as is.
    """
    from magface.checkpoint import mark_complete, save_model_file
    from magface.config import Config
    from magface.preprocess import PixelConvention

    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {sorted(SOURCES)}")
    spec = SOURCES[source]
    file = Path(src)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such weights file")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or a pickle holding code objects
        raise WeightsImportError(f"{file}: not readable as plain torch weights ({type(exc).__name__}: {exc})") from None
    state = _state_dict_of(payload, file)
    classifier = state.get("module.fc.weight", state.get("fc.weight")) if "module.features.conv1.weight" in state \
        or "features.conv1.weight" in state else None
    n_classes = int(classifier.shape[1]) if classifier is not None and classifier.ndim == 2 else None
    state = _strip_prefixes(state, file)
    found = infer_arch(state)
    arch = arch or found
    if arch not in STAGES:
        raise WeightsImportError(f"{file}: cannot tell the iResNet depth from the keys; pass --arch (one of "
                           f"{', '.join(STAGES)})")
    converted, kwargs = convert_state_dict(state, arch, file)
    kwargs.update(bn_eps=spec["bn_eps"], trainable_feature_scale=spec["trainable_feature_scale"],
                  dropout=spec["dropout"])
    convention = PixelConvention.named(spec["convention"])
    # the config the weights correspond to, as far as the file tells (the training data is not in it)
    cfg = Config().to_dict()
    cfg["data"].update(image_size=kwargs["input_size"], pixel_convention=spec["convention"])
    if n_classes:
        cfg["data"]["num_classes"] = n_classes
    cfg["model"].update(backbone=arch, embedding_size=kwargs["embedding_size"],
                        trainable_feature_scale=spec["trainable_feature_scale"],
                        backbone_kwargs={"bn_eps": spec["bn_eps"], "dropout": spec["dropout"]})
    cfg["loss"]["kind"] = spec["loss"]
    epoch = payload.get("epoch", 0) if isinstance(payload, dict) else 0
    out_dir = Path(out_dir)
    path = save_model_file(out_dir, arch, kwargs, converted, convention, cfg,
                           int(epoch) if isinstance(epoch, int) else 0, 0)
    mark_complete(out_dir)
    return path


def init_source(path, cfg) -> tuple[dict, dict]:
    """(backbone state dict, backbone kwargs to adopt) from the project checkpoint `model.init_from` names,
    checked against the run's config: same backbone, embedding size, input size and pixel convention (a
    network fine-tuned on other pixels than it learnt is silently worse). The adopted kwargs: its BN eps."""
    from magface.checkpoint import load_model_file
    from magface.models.iresnet import BN_EPS
    from magface.preprocess import PixelConvention

    ckpt = load_model_file(path)
    kw = ckpt["backbone_kwargs"]
    wanted = {"model.backbone": (ckpt["backbone"], cfg.model.backbone),
              "model.embedding_size": (kw.get("embedding_size", 512), cfg.model.embedding_size),
              "data.image_size": (kw.get("input_size", 112), cfg.data.image_size),
              "data.pixel_convention": (PixelConvention.from_dict(ckpt["preprocessing"]).name,
                                        cfg.data.convention.name)}
    for name, (theirs, ours) in wanted.items():
        if theirs != ours:
            raise ValueError(f"model.init_from {path}: the checkpoint has {name} = {theirs!r}, this run "
                             f"{ours!r}; set {name}: {theirs!r} to start from these weights")
    return ckpt["state_dict"], {"bn_eps": kw.get("bn_eps", BN_EPS)}
