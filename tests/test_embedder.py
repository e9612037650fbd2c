"""Model file I/O, the Embedder (stored pixel convention, flip fusion) and ONNX export against PyTorch."""

import numpy as np
import pytest
import torch

from magface.checkpoint import MODEL_FILE, load_model_file, save_model_file
from magface.cli import main as cli_main
from magface.embedder import Embedder
from magface.models import get_backbone
from magface.preprocess import PixelConvention

KW = {"embedding_size": 128, "input_size": 64}
BGR01 = PixelConvention("BGR", 0.0, 255.0)


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A small net with non-trivial BN statistics, saved with a BGR [0,1] convention."""
    torch.manual_seed(0)
    model = get_backbone("small", **KW)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, 64, 64) * 2 - 0.5)
    model.eval()
    directory = tmp_path_factory.mktemp("ckpt")
    save_model_file(directory, "small", KW, model.state_dict(), BGR01, {"loss": {"kind": "magface"}}, epoch=3, step=42)
    return directory, model


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def manual_features(model, imgs, conv):
    """Preprocessing written out independently: channel order, (x - mean) / std, NCHW."""
    x = imgs.astype(np.float64)
    if conv.channel_order == "BGR":
        x = x[..., ::-1]
    x = ((x - conv.mean) / conv.std).transpose(0, 3, 1, 2)
    with torch.no_grad():
        return model(torch.tensor(x, dtype=torch.float32)).double()


def test_model_file_round_trip_is_atomic(trained_like):
    directory, model = trained_like
    ckpt = load_model_file(directory)
    assert ckpt["format"] == "magface-checkpoint/1" and ckpt["backbone"] == "small"
    assert ckpt["backbone_kwargs"] == KW and ckpt["epoch"] == 3 and ckpt["step"] == 42
    assert PixelConvention.from_dict(ckpt["preprocessing"]) == BGR01
    assert ckpt["config"] == {"loss": {"kind": "magface"}}
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v)
    assert load_model_file(directory / MODEL_FILE)["step"] == 42
    assert sorted(p.name for p in directory.iterdir()) == [MODEL_FILE]  # no temporary left behind


def test_model_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / MODEL_FILE)):
        load_model_file(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=rf"{tmp_path / MODEL_FILE}: not a readable torch checkpoint"):
        load_model_file(tmp_path)
    torch.save({"format": "something-else/9"}, tmp_path / MODEL_FILE)
    with pytest.raises(ValueError, match=rf"{tmp_path / MODEL_FILE}: unknown checkpoint format 'something-else/9'"):
        load_model_file(tmp_path)
    torch.save({"format": "magface-checkpoint/1", "backbone": "small"}, tmp_path / MODEL_FILE)
    with pytest.raises(ValueError, match="missing field"):
        load_model_file(tmp_path)


def test_embedder_applies_the_stored_convention(trained_like):
    directory, model = trained_like
    emb = Embedder.from_checkpoint(directory, device="cpu")
    imgs = images(5)
    feats, mags = emb.embed(imgs, batch_size=2)
    want = manual_features(model, imgs, BGR01)
    assert feats.dtype == np.float32 and feats.shape == (5, 128) and mags.shape == (5,)
    np.testing.assert_allclose(mags, want.norm(dim=1).numpy(), rtol=1e-4)
    np.testing.assert_allclose(feats, torch.nn.functional.normalize(want, dim=1).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    # the convention matters: the insightface one gives different features for the same weights
    other = manual_features(model, imgs, PixelConvention.named("insightface"))
    assert not np.allclose(mags, other.norm(dim=1).numpy(), rtol=1e-2)


def test_flip_fusion_sums_features_and_keeps_unflipped_magnitude(trained_like):
    directory, model = trained_like
    emb = Embedder.from_checkpoint(directory / MODEL_FILE, device="cpu")
    imgs = images(3, seed=1)
    feats, mags = emb.embed(imgs, flip=True)
    f = manual_features(model, imgs, BGR01)
    f_flip = manual_features(model, np.ascontiguousarray(imgs[:, :, ::-1]), BGR01)
    np.testing.assert_allclose(feats, torch.nn.functional.normalize(f + f_flip, dim=1).numpy(), atol=1e-5)
    np.testing.assert_allclose(mags, f.norm(dim=1).numpy(), rtol=1e-4)


def test_embedder_rejects_wrong_images(trained_like):
    emb = Embedder.from_checkpoint(trained_like[0], device="cpu")
    with pytest.raises(ValueError, match="uint8 images N x 64 x 64 x 3"):
        emb.embed(images(2).astype(np.float32))
    with pytest.raises(ValueError, match="got torch.uint8 \\(2, 112, 112, 3\\)"):
        emb.embed(np.zeros((2, 112, 112, 3), np.uint8))


def test_onnx_export_matches_pytorch(trained_like, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    directory, _ = trained_like
    out = tmp_path / "model.onnx"
    assert cli_main(["export", "--onnx", "--checkpoint", str(directory), "--out", str(out)]) == 0
    import onnx

    model = onnx.load(str(out))
    assert model.opset_import[0].version >= 17
    assert "BGR" in {p.key: p.value for p in model.metadata_props}["preprocessing"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    imgs = images(7, seed=2)  # a batch size other than the export example's: dynamic batch
    onnx_feats, onnx_mags = session.run(["features", "magnitudes"], {"images": imgs})
    feats, mags = Embedder.from_checkpoint(directory, device="cpu").embed(imgs)
    np.testing.assert_allclose(onnx_feats, feats, atol=1e-4)
    np.testing.assert_allclose(onnx_mags, mags, rtol=1e-4, atol=1e-4)
