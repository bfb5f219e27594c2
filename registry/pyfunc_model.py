"""The MLflow pyfunc face of a fedseg model, so `mlflow models serve` can load it too.

This file is logged as "model from code" (MLflow runs it at load time), so nothing is pickled.

The logged artifacts are ``state_dict.pt`` (tensors only) and ``spec.json``; the network is
rebuilt by the same factory that trained it. No nn.Module is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch

from imaging.model import load_state_dict, select_device
from imaging.spec import ModelSpec

__all__ = ["FedsegUNet"]


class FedsegUNet(mlflow.pyfunc.PythonModel):
    """Input: preprocessed slices ``(N, 1, S, S)`` float32; output: lesion probabilities."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        spec = ModelSpec.from_dict(json.loads(Path(context.artifacts["spec"]).read_text()))
        state = torch.load(context.artifacts["state_dict"], weights_only=True, map_location="cpu")
        self.device = select_device()
        self.net = load_state_dict(spec, state).to(self.device).eval()

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32), device=self.device)
        with torch.no_grad():
            return torch.sigmoid(self.net(x)).cpu().numpy()


mlflow.models.set_model(FedsegUNet())
