"""A trained backbone as an MLflow model: a pyfunc around the `Embedder`, so the pixel convention travels
inside the model and `mlflow.pyfunc.load_model(uri).predict(images)` (or `mlflow models serve`) gives what
`Embedder.embed` gives.

Input: uint8 RGB images N x H x W x 3 (H = W = the model's input size; aligned face crops). Output:
{"embedding": float32 N x d, unit length, "magnitude": float32 N, the quality score}. The model folder holds
the checkpoint's model.pt (weights only, read with torch.load(weights_only=True)) and a copy of the `magface`
package (code_paths), so loading needs torch and numpy, not this repository.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency; keep the module importable without it
    PythonModel = object


# MLflow warns when predict has no type hint; the tensor signature given at logging time validates inputs
# (its type-hint validation does not know numpy image tensors).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")

    class EmbedderModel(PythonModel):
        """pyfunc: images -> {"embedding", "magnitude"}; built from the artifact "checkpoint" (a model.pt)."""

        def load_context(self, context):
            from magface.embedder import Embedder

            self.embedder = Embedder.from_checkpoint(context.artifacts["checkpoint"])

        def predict(self, context, model_input, params=None):
            images = np.asarray(model_input)
            if images.ndim == 3:  # one image
                images = images[None]
            feats, mags = self.embedder.embed(images.astype(np.uint8, copy=False))
            return {"embedding": feats.astype(np.float32), "magnitude": mags.astype(np.float32)}


def log_embedder_model(checkpoint: str, *, run_id: str, tracking_uri: str, name: str = "backbone",
                       registered_model_name: str | None = None, example_size: int = 2) -> str:
    """Log `checkpoint` (a directory or s3:// prefix holding model.pt) as an MLflow model of run `run_id`;
    returns its URI (models:/<model id>). With registered_model_name it is also registered."""
    import mlflow
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    import magface
    from magface.checkpoint import MODEL_FILE, load_model_file, model_summary
    from magface.data import storage

    payload = load_model_file(checkpoint)
    info = model_summary(payload)
    size = int(info["input_size"])
    with tempfile.TemporaryDirectory(prefix="magface_mlflow_model_") as tmp:
        local = Path(tmp) / MODEL_FILE
        src = str(checkpoint) if str(checkpoint).endswith(".pt") else storage.join(str(checkpoint), MODEL_FILE)
        local.write_bytes(storage.read_bytes(src))
        example = np.random.default_rng(0).integers(0, 256, (example_size, size, size, 3), dtype=np.uint8)
        model = EmbedderModel()

        class _Ctx:  # the output example for the signature, computed as the served model will
            artifacts = {"checkpoint": str(local)}

        model.load_context(_Ctx())
        signature = infer_signature(example, model.predict(None, example))
        # MLflow files a logged model under the *active* experiment, not its run's: name the run's
        experiment = mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
        client = mlflow.MlflowClient(tracking_uri)
        for m in client.search_logged_models(experiment_ids=[experiment],
                                             filter_string=f"source_run_id = '{run_id}'"):
            if m.tags.get("checkpoint") == str(checkpoint):  # a re-run of a finished job: logged already
                return m.model_uri
        # _env outermost: leaving _use_tracking_uri unsets MLFLOW_TRACKING_URI, which _env then puts back
        with _env("MLFLOW_TRACKING_URI", tracking_uri or mlflow.get_tracking_uri()), \
                _use_tracking_uri(tracking_uri), _env("MLFLOW_EXPERIMENT_ID", experiment):
            logged = mlflow.models.Model.log(
                None, name=name, flavor=mlflow.pyfunc, run_id=run_id, python_model=EmbedderModel(),
                artifacts={"checkpoint": str(local)}, code_paths=[str(Path(magface.__file__).parent)],
                signature=signature, input_example=example, registered_model_name=registered_model_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                                  "simplejpeg", "pillow", "pyyaml", "boto3"],
                metadata={"pixel_convention": info["convention"], "loss": info["loss"],
                          "backbone": info["backbone"], "epoch": info["epoch"], "step": info["step"],
                          "input": f"uint8 RGB N x {size} x {size} x 3, aligned face crops",
                          "output": "embedding (unit, float32 N x d), magnitude (quality, float32 N)"},
                tags={"loss": info["loss"], "backbone": info["backbone"], "checkpoint": str(checkpoint)})
    return logged.model_uri


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
