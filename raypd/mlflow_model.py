"""The MLflow pyfunc model of a raypd study ("models from code": MLflow runs this file to
load the model; nothing is pickled). Its artifact `model` is a file written by
raypd.serve.SavedModel.save: the CNN's weights and the saved normalisation, read with
torch.load(weights_only=True).

Input: raw series (N, 2n, T) float32, exactly as a dataset's `series` column (row-major
(channel, time)). Output: (N, n_targets) float64, the parameters in layout order then the
initial conditions, raw units. With the inference parameter `interval_level` in (0, 1)
(`{"inputs": X, "params": {"interval_level": 0.9}}` when served; 0, the default, for none)
the output is {"estimate", "lower", "upper"}, each (N, n_targets): the estimates and their
split-conformal intervals (raypd.intervals). Bad input (shape, NaN, a level outside (0, 1))
is an MlflowException (HTTP 400 when served).
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
        level = (params or {}).get("interval_level") or 0.0
        try:
            if level == 0.0:
                return self.model.predict(np.asarray(model_input))
            estimate, lower, upper = self.model.predict_with_intervals(np.asarray(model_input), level)
            return {"estimate": estimate, "lower": lower, "upper": upper}
        except ValueError as exc:
            raise MlflowException.invalid_parameter_value(f"raypd model: {exc}") from None


mlflow.models.set_model(RaypdModel())
