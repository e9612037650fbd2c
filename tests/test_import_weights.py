"""`magface import-weights`: official MagFace and arcface_torch iResNet checkpoints -> project checkpoints whose
embeddings equal the reference networks'.

The reference networks are built here from the published architecture (key names, shapes, layer order, BN eps
per repository) and saved the way each repository saves them: MagFace `torch.save({"epoch", "arch",
"state_dict": DataParallel(builder).state_dict()})` with the backbone under `module.features.` and the MagLinear
classifier as `module.fc.weight`; arcface_torch a plain backbone state dict (`backbone.pth`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from magface.checkpoint import load_model_file
from magface.cli import main as cli
from magface.embedder import Embedder
from magface.models import get_backbone
from magface.preprocess import PixelConvention

LAYERS = {"iresnet18": (2, 2, 2, 2), "iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}
EPS = {"magface": 2e-5, "insightface": 1e-5}


class RefBlock(nn.Module):
    """IBasicBlock as published: bn1 conv1 bn2 prelu conv2(stride) bn3, plus downsample(x) or x."""

    def __init__(self, cin, cout, stride, eps):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=eps)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=eps))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class RefIResNet(nn.Module):
    """conv1 bn1 prelu layer1..4 bn2 dropout fc(512*7*7 -> 512) features(BN1d), as both repositories name it."""

    def __init__(self, layers, eps):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=eps)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512)), 1):
            setattr(self, f"layer{i}", nn.Sequential(*[RefBlock(cin if j == 0 else width, width, 2 if j == 0 else 1, eps)
                                                       for j in range(n)]))
            cin = width
        self.bn2 = nn.BatchNorm2d(512, eps=eps)
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(512 * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512, eps=eps)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.dropout(self.bn2(x)), 1)))


def _reference(arch, source, seed=0):
    torch.manual_seed(seed)
    net = RefIResNet(LAYERS[arch], EPS[source])
    with torch.no_grad():  # trained-looking BN statistics and PReLU slopes, so that eps and every tensor matter
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.weight.uniform_(0.3, 0.8)  # tame enough that 100 residual blocks stay well scaled
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(1000)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.1, 0.3)
    return net.eval()


def _save_like_the_repo(net, source, path, arch):
    if source == "magface":
        builder = nn.Module()
        builder.features = net
        builder.fc = nn.Module()
        builder.fc.weight = nn.Parameter(torch.randn(512, 10))  # MagLinear: (in_features, classes)
        torch.save({"epoch": 25, "arch": arch, "state_dict": nn.DataParallel(builder).state_dict()}, path)
    else:
        torch.save(net.state_dict(), path)


def _reference_input(images, source):
    """Each repository's own preprocessing: MagFace cv2 BGR, ToTensor (x/255); arcface_torch RGB (x/255-0.5)/0.5."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double()
    return x.flip(1) / 255.0 if source == "magface" else (x / 255.0 - 0.5) / 0.5


@pytest.mark.parametrize("source", ["magface", "insightface"])
@pytest.mark.parametrize("arch", ["iresnet50", "iresnet100"])
def test_imported_weights_give_the_reference_embeddings(tmp_path, source, arch):
    torch.set_num_threads(2)
    net = _reference(arch, source)
    src = tmp_path / ("magface_epoch_00025.pth" if source == "magface" else "backbone.pth")
    _save_like_the_repo(net, source, src, arch)
    out = tmp_path / "imported"
    assert cli(["import-weights", "--from", source, str(src), "--arch", arch, "--out", str(out)]) == 0

    payload = load_model_file(out)
    kw = payload["backbone_kwargs"]
    assert (kw["bn_eps"], kw["trainable_feature_scale"]) == (EPS[source], source == "magface")
    assert PixelConvention.from_dict(payload["preprocessing"]).name == (
        "magface_official" if source == "magface" else "insightface")
    model = get_backbone(payload["backbone"], **kw)
    model.load_state_dict(payload["state_dict"])
    assert model.head.features.weight.requires_grad == (source == "magface")

    images = np.random.default_rng(1).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    ref_x = _reference_input(images, source)
    conv = PixelConvention.from_dict(payload["preprocessing"])
    np.testing.assert_allclose(conv.apply(torch.from_numpy(images)).double(), ref_x, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # float64: the same operations on the same numbers, bit for bit
        expect = net.double()(ref_x)
        got = model.double().eval()(ref_x)
    assert torch.isfinite(expect).all() and expect.norm(dim=1).min() > 1
    assert torch.equal(got, expect)
    if arch == "iresnet50":
        other = get_backbone(payload["backbone"], **{**kw, "bn_eps": EPS["magface"] + EPS["insightface"] - kw["bn_eps"]})
        other.load_state_dict(payload["state_dict"])
        with torch.no_grad():  # the eps matters at this precision: the wrong one would not be bit-equal
            assert not torch.equal(other.double().eval()(ref_x), expect)
    # float32 through the Embedder, with its own pixel handling
    f32 = Embedder.from_checkpoint(out, device="cpu").raw_features(images).double()
    with torch.no_grad():
        ref32 = net.float()(ref_x.float()).double()
    assert (f32 - ref32).abs().max() <= 1e-5 * ref32.abs().max()


def test_import_refuses_foreign_files_naming_file_and_key(tmp_path, capsys):
    net = _reference("iresnet18", "insightface")
    sd = net.state_dict()
    bad = tmp_path / "extra.pth"
    torch.save({**sd, "head.weight": torch.zeros(3)}, bad)
    assert cli(["import-weights", "--from", "insightface", str(bad), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "extra.pth" in err and "'head.weight'" in err
    wrong = tmp_path / "r18.pth"
    torch.save(sd, wrong)
    assert cli(["import-weights", "--from", "insightface", str(wrong), "--arch", "iresnet50",
                "--out", str(tmp_path / "o2")]) == 2
    assert "pass --arch iresnet18" in capsys.readouterr().err
    nested = tmp_path / "nested.pth"
    torch.save({"model": sd, "optimizer": [1, 2]}, nested)
    assert cli(["import-weights", "--from", "magface", str(nested), "--out", str(tmp_path / "o3")]) == 2
    assert "nested.pth: entry 'model' is a OrderedDict, not a tensor" in capsys.readouterr().err
    code = tmp_path / "code.pth"
    torch.save({"state_dict": sd, "hook": nn.ReLU()}, code)  # an object: loading would run its pickle
    assert cli(["import-weights", "--from", "magface", str(code), "--out", str(tmp_path / "o4")]) == 2
    assert "code.pth: not readable as plain torch weights" in capsys.readouterr().err
    assert not (tmp_path / "o4").exists()


def test_evaluate_pipeline_runs_on_an_imported_checkpoint(ray_session, tmp_path):
    """An arcface_torch-style iResNet18, imported, evaluated by pipelines/evaluate.py on tiny synthetic sets:
    the .bin accuracy equals insightface's protocol on the Embedder's flip-fused features."""
    import importlib.util
    from pathlib import Path

    from magface.data.binfile import load_bin
    from magface.data.synthetic import generate
    from magface.evaluation.ijb import load_face
    from magface.evaluation.verification import verification_accuracy

    root = tmp_path / "data"
    generate(root, num_train_ids=2, images_per_id=1, num_eval_ids=3, eval_images_per_id=4, image_size=56,
             bin_pairs=12, ijb_templates_per_id=2, ijb_media_per_template=1, workers=1)
    src = tmp_path / "backbone.pth"
    _save_like_the_repo(_reference("iresnet18", "insightface"), "insightface", src, "iresnet18")
    ckpt = tmp_path / "r18"
    assert cli(["import-weights", "--from", "insightface", str(src), "--out", str(ckpt)]) == 0  # arch from keys

    spec = importlib.util.spec_from_file_location("evaluate_pipeline",
                                                  Path(__file__).resolve().parents[1] / "pipelines" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--checkpoint", str(ckpt), "--data-root", str(root), "--benchmarks", "synth_ijb,synth_verify",
                    "--batch-size", "16", "--no-tracking"])
    m = out["metrics"]
    assert m["failed_images"] == 0 and "synth_ijb.insightface.tar_far_1e-1" in m
    images, issame = load_bin(root / "verify" / "synth.bin")
    faces = np.stack([load_face(bytes(b), None, None, 112, f"image {i}") for i, b in enumerate(images)])
    f, _ = Embedder.from_checkpoint(ckpt, device="cpu").embed(faces, flip=True)
    assert m["synth_verify.accuracy"] == pytest.approx(verification_accuracy(f[0::2], f[1::2], issame)[0], abs=1e-12)


def test_init_from_takes_the_backbone_and_its_eps_and_refuses_mismatches(tmp_path):
    from magface.config import Config
    from magface.models.imported import init_source

    src = tmp_path / "backbone.pth"
    _save_like_the_repo(_reference("iresnet18", "insightface"), "insightface", src, "iresnet18")
    ckpt = tmp_path / "r18"
    assert cli(["import-weights", "--from", "insightface", str(src), "--out", str(ckpt)]) == 0
    base = {"data": {"num_classes": 5, "image_size": 112}, "model": {"backbone": "iresnet18", "init_from": str(ckpt)}}
    state, adopted = init_source(ckpt, Config.from_dict(base))
    assert adopted == {"bn_eps": 1e-5}
    model = get_backbone("iresnet18", **adopted)
    model.load_state_dict(state)  # every tensor, strictly
    assert torch.equal(model.stem[0].weight, _reference("iresnet18", "insightface").conv1.weight)
    for key, value, field in (("model", {"backbone": "iresnet50"}, "model.backbone"),
                              ("data", {"pixel_convention": "magface_official"}, "data.pixel_convention")):
        cfg = Config.from_dict({**base, key: {**base[key], **value}})
        with pytest.raises(ValueError, match=rf"r18: the checkpoint has {field} = .*; set {field}"):
            init_source(ckpt, cfg)


@pytest.mark.slow
def test_training_starts_from_init_from(ray_session, tmp_path):
    """model.init_from through the real job: the first checkpoint holds the given backbone (lr ~ 0, frozen BN)
    and carries the source's BN eps."""
    import ray

    from magface.checkpoint import save_model_file
    from magface.train.trainer import run
    from tests.test_train import IMAGE, random_rows, tiny_config

    torch.manual_seed(3)
    kwargs = {"embedding_size": 16, "input_size": IMAGE, "width": 4, "bn_eps": 1e-5, "trainable_feature_scale": True}
    start = get_backbone("small", **kwargs).state_dict()
    save_model_file(tmp_path / "init", "small", kwargs, start, PixelConvention.named("insightface"), {}, 0, 0)
    cfg = tiny_config(tmp_path, "init_from", model={"freeze_bn": True, "init_from": str(tmp_path / "init")},
                      optim={"lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0, "grad_clip": 0.0})
    result = run(cfg, ray.data.from_items(random_rows(8)))
    assert result.error is None
    saved = load_model_file(result.checkpoint_path)
    assert saved["backbone_kwargs"]["bn_eps"] == 1e-5
    for k, v in start.items():
        assert torch.allclose(saved["state_dict"][k].float(), v.float(), atol=1e-9), k
