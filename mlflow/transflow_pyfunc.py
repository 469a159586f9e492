"""MLflow "model from code" for transflow's registered task models (copied into each logged model by MLflow).

MLflow executes this file when it loads the model (`mlflow.pyfunc.load_model`, `mlflow models serve`); it needs
only `mlflow` and the light edge distribution (`transflow-edge`: onnxruntime, tokenizers, no torch). The logic is
`transflow_edge.mlflow_model.BundlePyfunc`; the subclass exists because MLflow accepts only a `PythonModel`, and
it lives here, outside every product package, so the edge package itself never imports MLflow.
"""

import mlflow
from transflow_edge.mlflow_model import BundlePyfunc


class TransflowBundleModel(BundlePyfunc, mlflow.pyfunc.PythonModel):
    """A verified ONNX bundle behind the edge server's preprocessing and onnxruntime session."""


mlflow.models.set_model(TransflowBundleModel())
