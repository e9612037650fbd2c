"""pipelines/embed.py: a folder of images and RecordIO shards -> Parquet rows (path or shard+key, label, unit
embedding, magnitude) that match the Embedder run directly; the quality summary and threshold report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from magface.checkpoint import save_model_file
from magface.data.codec import decode_jpeg, encode_jpeg
from magface.embedder import Embedder
from magface.models import get_backbone
from magface.preprocess import PixelConvention

REPO = Path(__file__).resolve().parents[1]
KW = {"embedding_size": 16, "input_size": 32}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = get_backbone("small", **KW)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial BatchNorm statistics
            model(torch.rand(8, 3, 32, 32) * 2 - 0.5)
    d = tmp_path_factory.mktemp("ckpt")
    save_model_file(d, "small", KW, model.state_dict(), PixelConvention("BGR", 0.0, 255.0),
                    {"loss": {"kind": "magface", "l_a": 10.0, "u_a": 110.0}}, 2, 20)
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 identities x 5 JPEGs of 32x32, plus one file that is not an image."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(1)
    for person in ("ann", "bob", "cid"):
        (root / person).mkdir()
        for j in range(5):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            (root / person / f"{j}.jpg").write_bytes(encode_jpeg(img, quality=90))
    (root / "cid" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def _expected(checkpoint, encoded: list[bytes]):
    emb = Embedder.from_checkpoint(checkpoint, device="cpu")
    return emb.embed(np.stack([decode_jpeg(b) for b in encoded]))


def test_folder_rows_match_the_embedder(ray_session, checkpoint, folder, tmp_path):
    from magface.batch_embed import embed

    out = tmp_path / "out"
    res = embed(str(checkpoint), str(folder), str(out), batch_size=4, actors=1, threshold=None, progress=False)
    table = pq.read_table(out).to_pandas().sort_values("path").reset_index(drop=True)
    assert len(table) == 16 and res.rows == 16 and res.failed == 1
    bad = table[table.error != ""]
    assert list(bad.path) == [str(folder / "cid" / "broken.jpg")] and np.isnan(bad.magnitude).all()
    good = table[table.error == ""]
    feats, mags = _expected(checkpoint, [Path(p).read_bytes() for p in good.path])
    np.testing.assert_allclose(np.stack(good.embedding.to_numpy()), feats, atol=1e-5)
    np.testing.assert_allclose(good.magnitude.to_numpy(), mags, rtol=1e-5)
    assert list(good.label) == [Path(p).parent.name for p in good.path]
    assert np.stack(good.embedding.to_numpy()).dtype == np.float32
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["embedded"] == 15 and summary["failed"] == 1
    assert summary["magnitude"]["p50"] == pytest.approx(float(np.percentile(mags, 50)), rel=1e-5)
    assert (out / "_quality_histogram.png").stat().st_size > 1000


def test_shards_through_the_cli_with_a_threshold(ray_session, checkpoint, folder, tmp_path, capsys):
    from magface.data.convert import convert_folder
    from magface.data.datasource import read_recordio

    clean = tmp_path / "clean"
    for person in ("ann", "bob", "cid"):
        (clean / person).mkdir(parents=True)
        for f in sorted((folder / person).glob("[0-9].jpg")):
            (clean / person / f.name).write_bytes(f.read_bytes())
    convert_folder(clean, tmp_path / "shards", 2, progress=False)
    records = read_recordio(str(tmp_path / "shards"), include_paths=True).take_all()
    _, mags = _expected(checkpoint, [r["image"] for r in records])
    threshold = float(np.median(mags))

    sys.path.insert(0, str(REPO / "pipelines"))
    try:
        import embed as cli
    finally:
        sys.path.remove(str(REPO / "pipelines"))
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--input", str(tmp_path / "shards"), "--output", str(out),
            "--threshold", str(threshold), "--actors", "1", "--batch-size", "4"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    table = pq.read_table(out).to_pandas()
    assert len(table) == len(records) == 15 and (table.error == "").all()
    by_id = {(Path(r["path"]).name, r["key"]): (r["label"], m) for r, m in zip(records, mags)}
    for row in table.itertuples():
        label, mag = by_id[(Path(row.shard).name, row.key)]
        assert row.label == label and row.magnitude == pytest.approx(mag, rel=1e-5)
    n_below = int((mags < threshold).sum())
    assert f"{n_below} image(s) ({100 * n_below / 15:.1f}%) below |f| = {threshold:g}" in printed
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["threshold"]["below"] == n_below and len(summary["threshold"]["examples_below"]) == n_below

    from magface.batch_embed import EmbedInputError

    with pytest.raises(EmbedInputError, match="already holds .* Parquet part"):
        cli.main(argv)


def test_s3_in_and_out(ray_session, s3_env, checkpoint, folder, tmp_path):
    """Images under an s3:// prefix -> Parquet parts and summary under another (a real S3 server on 127.0.0.1)."""
    import io

    import boto3
    import pyarrow as pa

    from magface.batch_embed import embed
    from tests.s3_server import make_bucket

    make_bucket("faces")
    s3 = boto3.client("s3")
    sent = {}
    for f in sorted(folder.glob("[ab]*/[0-2].jpg")):
        key = f"in/{f.parent.name}/{f.name}"
        s3.put_object(Bucket="faces", Key=key, Body=f.read_bytes())
        sent[f"s3://faces/{key}"] = f.read_bytes()
    res = embed(str(checkpoint), "s3://faces/in", "s3://faces/out", batch_size=4, actors=1, progress=False)
    assert res.rows == len(sent) == 6 and res.failed == 0
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="faces", Prefix="out/")["Contents"])
    assert "out/_summary.json" in keys and "out/_quality_histogram.png" in keys
    parts = [pq.read_table(io.BytesIO(s3.get_object(Bucket="faces", Key=k)["Body"].read()))
             for k in keys if k.endswith(".parquet")]
    table = pa.concat_tables(parts).to_pandas().sort_values("path")
    assert list(table.path) == sorted(sent) and list(table.label) == [p.split("/")[-2] for p in sorted(sent)]
    _, mags = _expected(checkpoint, [sent[p] for p in table.path])
    np.testing.assert_allclose(table.magnitude.to_numpy(), mags, rtol=1e-5)
