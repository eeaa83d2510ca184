"""The MLflow pyfunc model of a raypd study ("models from code": MLflow runs this file to
load the model; nothing is pickled). Its artifact `model` is a file written by
raypd.serve.SavedModel.save: the CNN's weights and the saved normalisation, read with
torch.load(weights_only=True).

Input: raw series (N, 2n, T) float32, exactly as a dataset's `series` column (row-major
(channel, time)). Output: (N, n_targets) float64, the parameters in layout order then the
initial conditions, raw units. Bad input (shape, NaN) is an MlflowException (HTTP 400 when
served).
"""

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel


class RaypdModel(PythonModel):
    def load_context(self, context):
        from raypd.serve import SavedModel

        self.model = SavedModel.load(context.artifacts["model"])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        try:
            return self.model.predict(np.asarray(model_input))
        except ValueError as exc:
            raise MlflowException.invalid_parameter_value(f"raypd model: {exc}") from None


mlflow.models.set_model(RaypdModel())
