"""The registered model's own code (MLflow "models from code"): images in, class names out.

MLflow stores this file with the model and runs it when the model is loaded or served; it is
never imported by the pipeline. The model's artifacts are the ONNX file (which carries the class
names, resolution and normalisation) and, with it, bit_core's serving code, so the model needs
only numpy, Pillow, pandas and ONNX Runtime where it runs. The OpenVINO IR, when the pipeline
built one, is registered beside them (``artifacts/openvino``) for ``bit predict`` on Intel CPUs;
this served model runs ONNX Runtime.

Input: a DataFrame with one column ``image``; each row is an encoded image (JPEG/PNG bytes, or
their base64 text in JSON) or a preprocessed tensor (nested lists, 3 x H x W). Output: one row
per image with ``classes`` and ``probabilities`` (the top ``top_k``, a parameter, default 5).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from bit_core.serving import ImageClassifier, decode


class BitImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.classifier = ImageClassifier(context.artifacts["onnx"])

    def _tensor(self, value, row: int) -> np.ndarray:
        if isinstance(value, (bytes, str)):
            return self.classifier.preprocess(decode(value, f"row {row}"))
        return np.asarray(value, np.float32)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        top_k = (params or {}).get("top_k")
        top_k = None if top_k is None else int(top_k)
        values = model_input["image"].tolist() if isinstance(model_input, pd.DataFrame) \
            else list(model_input)
        if not values:
            return pd.DataFrame({"classes": [], "probabilities": []})
        batch = np.stack([self._tensor(value, row) for row, value in enumerate(values)])
        found = self.classifier.top(self.classifier.probabilities(batch), top_k)
        return pd.DataFrame({"classes": [p.classes for p in found],
                             "probabilities": [p.probabilities for p in found]})


mlflow.models.set_model(BitImageModel())
