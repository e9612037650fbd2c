"""pipelines/evaluate.py end to end on a small synthetic dataset: Ray tasks + actor pool + MLflow (sqlite)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from magface.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, num_train_ids=2, images_per_id=2, num_eval_ids=8, eval_images_per_id=8, image_size=56,
             bin_pairs=40, ijb_templates_per_id=2, ijb_media_per_template=2, workers=1)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-init small network, saved as a training run would save it."""
    import torch

    from magface.checkpoint import save_model_file
    from magface.models import get_backbone
    from magface.preprocess import PixelConvention

    torch.manual_seed(0)
    kwargs = {"embedding_size": 32, "input_size": 56, "width": 8}
    model = get_backbone("small", **kwargs)
    d = tmp_path_factory.mktemp("runs") / "demo" / "checkpoint_000001"
    save_model_file(d, "small", kwargs, model.state_dict(), PixelConvention.named("insightface"), {}, 1, 10)
    return d


def _load_pipeline():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_pipeline", REPO / "pipelines" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_find_latest_checkpoint(tmp_path):
    from magface.evaluation.runner import find_latest_checkpoint

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_latest_checkpoint(tmp_path)
    from magface.checkpoint import mark_complete

    for i, name in enumerate(["a/checkpoint_000002", "b/checkpoint_000001", "d/checkpoint_000003"]):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "model.pt").write_bytes(b"x" * 1000)
        mark_complete(tmp_path / name)
        os.utime(tmp_path / name / "model.pt", (time.time() - 100 + 50 * i,) * 2)
    (tmp_path / "c").mkdir()  # a folder without model.pt never counts
    # the newest was cut short while being copied (a worker killed during Ray's upload): never "the latest"
    with open(tmp_path / "d/checkpoint_000003/model.pt", "r+b") as f:
        f.truncate(300)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "b/checkpoint_000001"


def test_evaluate_pipeline_end_to_end(ray_session, mlflow_uri, synth_root, checkpoint, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from magface.embedder import Embedder
    from magface.evaluation.ijb import find_ijb_dir, load_face, read_protocol
    from magface.evaluation.metrics import tar_at_far
    from magface.evaluation.templates import aggregate_templates, score_pairs
    from magface.tracking import Tracker

    parent = Tracker.start("train-run")
    out = _load_pipeline().main([
        "--checkpoint", str(checkpoint), "--data-root", str(synth_root), "--run-id", parent.run_id,
        "--benchmarks", "synth_ijb,synth_verify,quality,cluster", "--batch-size", "32", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "SYNTH_IJB 1:1 verification" in printed and "[insightface]" in printed and "[magface_plus]" in printed

    # independent recomputation of one published number: align + embed serially, aggregate, score, TAR@FAR
    proto = read_protocol(find_ijb_dir(synth_root, "SYNTH"), "synth")
    emb = Embedder.from_checkpoint(checkpoint)
    faces = np.stack([load_face(None, str(proto.image_dir / im), proto.landmarks[i], 56, im)
                      for i, im in enumerate(proto.images)])
    f, m = emb.embed(faces)
    t_ids, t_feats = aggregate_templates(f, m, proto.template_ids, proto.media_ids, mode="magface_plus")
    scores = score_pairs(t_feats, t_ids, proto.pairs[:, 0], proto.pairs[:, 1])
    expect = tar_at_far(scores, proto.labels, fars=(1e-2, 1e-1))
    assert out["metrics"]["synth_ijb.magface_plus.tar_far_1e-1"] == pytest.approx(expect[1e-1], abs=1e-9)
    assert out["metrics"]["synth_ijb.magface_plus.tar_far_1e-2"] == pytest.approx(expect[1e-2], abs=1e-9)
    assert out["metrics"]["failed_images"] == 0
    assert (tmp_path / "evaluation.json").is_file()

    # the MLflow run: a child of the training run with metrics, tables and plots
    client = MlflowClient()
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    metrics = run.data.metrics
    for rule in ("insightface", "magface_plus"):  # the default conventions, named in every metric
        for far in ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"):
            assert f"synth_ijb.{rule}.tar_far_{far}" in metrics
            assert f"synth_ijb.{rule}.tar_far_{far}.strict" in metrics
        for key in ("edc_pauc20_fmr_1e-3", "edc_pauc30_fmr_1e-3", "edc_pauc20_fmr_1e-4"):
            assert 0.0 <= metrics[f"synth_ijb.{rule}.{key}"] <= 0.3
    assert run.data.params["conventions"] == "insightface,magface_plus" and run.data.params["flip"] == "True"
    assert 0.0 <= metrics["synth_verify.edc_pauc20_fmr_1e-3"] <= 0.2 and "quality.magnitude.edc_pauc30_fmr_1e-4" in metrics
    assert -1.0 <= metrics["quality_spearman"] <= 1.0
    assert 0.0 <= metrics["synth_verify.accuracy"] <= 1.0 and "cluster.kmeans.bcubed_f" in metrics

    def files(path=None):
        out = []
        for a in client.list_artifacts(run.info.run_id, path):
            out += files(a.path) if a.is_dir else [a.path]
        return out

    arts = files()
    for name in ("plots/synth_ijb_roc.png", "plots/quality_erc.png", "plots/synth_ijb_edc.png", "plots/quality_edc.png", "plots/synth_verify_magnitudes.png",
                 "plots/cluster_magnitude_vs_center.png", "evaluation/tables.json", "evaluation/tar_at_far.csv"):
        assert name in arts, arts
    png = Path(client.download_artifacts(run.info.run_id, "plots/synth_ijb_roc.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # it says what it evaluated: the full checkpoint path and loss kind, printed and logged; inputs with digests
    assert f"[evaluate] checkpoint {checkpoint.resolve()}" in printed and "loss" in printed
    assert run.data.tags["checkpoint_path"] == str(checkpoint.resolve()) and run.data.params["loss"]
    assert run.info.run_name.startswith(f"eval {run.data.params['loss']} ") and "synth_ijb" in run.info.run_name
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"SYNTH", "synth"}


def test_bad_images_skip_counts_and_raise_names_the_file(ray_session, mlflow_uri, synth_root, checkpoint,
                                                          tmp_path):
    import shutil

    from magface.evaluation.ijb import BadImageError
    from magface.evaluation.runner import evaluate

    root = tmp_path / "data"
    shutil.copytree(synth_root / "ijb", root / "ijb")
    (root / "ijb" / "SYNTH" / "loose_crop" / "3.jpg").write_bytes(b"\xff\xd8 truncated")
    lm_file = root / "ijb" / "SYNTH" / "meta" / "synth_name_5pts_score.txt"
    lines = lm_file.read_text().splitlines()
    parts = lines[4].split()
    parts[1] = "900.0"  # landmark x far outside the 175 px crop
    lines[4] = " ".join(parts)
    lm_file.write_text("\n".join(lines) + "\n")

    out = evaluate(checkpoint, ["synth_ijb"], root, on_bad_image="skip", batch_size=32, tracking=False,
                   show=False)
    # the undecodable image is skipped; the face with a landmark outside is aligned as OpenCV would, and counted
    assert out["metrics"]["failed_images"] == 1 and out["metrics"]["synth_ijb.landmarks_outside"] == 1
    assert out["tables"]["synth_ijb"]["n_images_used"] == out["tables"]["synth_ijb"]["n_images"] - 1
    with pytest.raises(BadImageError, match=r"3.jpg \(.*synth_name_5pts_score.txt:3\): cannot read image"):
        evaluate(checkpoint, ["synth_ijb"], root, on_bad_image="raise", batch_size=32, tracking=False, show=False)


def test_s3_data_root_mirrors_only_needed_sets(s3_env, synth_root, tmp_path):
    from magface.data import storage
    from magface.evaluation.ijb import read_protocol
    from magface.evaluation.runner import local_data_root, needed_sets
    from tests.s3_server import make_bucket

    make_bucket("evalsets")
    for p in sorted(synth_root.rglob("*")):
        if p.is_file() and not p.relative_to(synth_root).as_posix().startswith("train/"):
            storage.upload_file(p, f"s3://evalsets/synthetic/{p.relative_to(synth_root).as_posix()}")
    storage.upload_file(synth_root / "manifest.json", "s3://evalsets/synthetic/other/big.bin")
    local = local_data_root("s3://evalsets/synthetic", needed_sets(["synth_ijb", "quality"]), cache_dir=tmp_path)
    assert local == tmp_path / "evalsets" / "synthetic"
    for rel in ("verify/synth.bin", "verify/synth_quality.csv", "ijb/SYNTH/meta/synth_template_pair_label.txt",
                "ijb/SYNTH/loose_crop/1.jpg"):
        assert (local / rel).read_bytes() == (synth_root / rel).read_bytes()
    assert not (local / "other").exists()  # sets no benchmark needs are not fetched
    assert len(read_protocol(local / "ijb" / "SYNTH").images) == len(read_protocol(synth_root / "ijb" / "SYNTH").images)
    with pytest.raises(FileNotFoundError, match="IJBC not found under s3://evalsets/synthetic"):
        local_data_root("s3://evalsets/synthetic", needed_sets(["ijbc"]), cache_dir=tmp_path)


def test_cli_bad_input_is_named_before_any_compute(synth_root, checkpoint, tmp_path):
    import shutil

    from magface.evaluation.ijb import ProtocolError

    main = _load_pipeline().main
    root = tmp_path / "data"
    shutil.copytree(synth_root / "ijb", root / "ijb")
    pairs = root / "ijb" / "SYNTH" / "meta" / "synth_template_pair_label.txt"
    lines = pairs.read_text().splitlines()
    lines[2] = "1 9999 0"
    pairs.write_text("\n".join(lines) + "\n")
    with pytest.raises(ProtocolError, match=r"synth_template_pair_label.txt:3: template 9999 is not in"):
        main(["--checkpoint", str(checkpoint), "--data-root", str(root), "--benchmarks", "synth_ijb", "--no-tracking"])
    pairs.unlink()
    # no --checkpoint / --data-root: the newest checkpoint under --runs-root, the data root its config names
    from magface.checkpoint import load_model_file, mark_complete, save_model_file
    from magface.preprocess import PixelConvention

    ck = load_model_file(checkpoint)
    save_model_file(tmp_path / "runs" / "new", ck["backbone"], ck["backbone_kwargs"], ck["state_dict"],
                    PixelConvention(), {"eval": {"data_root": str(root)}}, 2, 20)
    mark_complete(tmp_path / "runs" / "new")
    with pytest.raises(ProtocolError, match=rf"missing protocol file {root}/.*synth_template_pair_label.txt"):
        main(["--runs-root", str(tmp_path / "runs"), "--benchmarks", "synth_ijb", "--no-tracking"])
    with pytest.raises(ValueError, match="unknown benchmark"):
        main(["--checkpoint", str(checkpoint), "--data-root", str(root), "--benchmarks", "ijbz"])
