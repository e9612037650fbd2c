"""MLflow the MLflow 3 way: the backbone logged as a model that mlflow.pyfunc.load_model serves with the
Embedder's results; datasets as run inputs with source and digest; the run description."""

from __future__ import annotations

import numpy as np

from magface.embedder import Embedder
from magface.preprocess import PixelConvention

from tests.test_batch_embed import checkpoint  # noqa: F401 - a small net with BatchNorm statistics, BGR [0,1]


def test_logged_model_loads_with_pyfunc_and_matches_the_embedder(mlflow_uri, checkpoint, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from magface.tracking import Tracker, dataset_digest

    shard = tmp_path / "train-00000-of-00001.rec"
    shard.write_bytes(b"x" * 100)
    tracker = Tracker.start("model-test", experiment="mlflow-model-test", description="a *test* run")
    tracker.log_dataset("train", str(tmp_path), dataset_digest([str(shard)]), context="training")
    uri = tracker.log_embedder_model(str(checkpoint), registered_model_name="magface-test")
    assert uri is not None and tracker.end()

    images = np.random.default_rng(5).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    served = mlflow.pyfunc.load_model(uri).predict(images)
    feats, mags = Embedder.from_checkpoint(checkpoint, device="cpu").embed(images)
    np.testing.assert_allclose(served["embedding"], feats, atol=1e-6)
    np.testing.assert_allclose(served["magnitude"], mags, rtol=1e-6)
    assert mlflow.pyfunc.load_model("models:/magface-test/1").metadata.metadata["pixel_convention"] == \
        PixelConvention("BGR", 0.0, 255.0).name

    client = MlflowClient(mlflow_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.tags["mlflow.note.content"] == "a *test* run"
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "train" and inp.dataset.digest == dataset_digest([str(shard)])
    assert str(tmp_path) in inp.dataset.source and inp.tags[0].value == "training"
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [tracker.run_id]
    sig = mlflow.models.get_model_info(uri).signature
    assert sig.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"
