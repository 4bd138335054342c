"""The MLflow pyfunc view of an exported tokenizer (models from code: MLflow loads this file, nothing is pickled).

`predict` encodes images (N x 3 x H x W floats in [-1, 1]) into latents with the registered tokenizer. A registered
DiT keeps its safetensors export as an artifact; sampling needs its tokenizer too, so it is done with
`aligntok sample` rather than through pyfunc.
"""
import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class ExportedModel(PythonModel):
    def load_context(self, context):
        import json
        from pathlib import Path
        self.folder = Path(context.artifacts["export"])
        self.kind = json.loads((self.folder / "config.json").read_text()).get("kind", "dit")
        self.model = None
        if self.kind in ("aligntok", "vae", "external"):  # external: a pretrained diffusers VAE (models/external.py)
            from aligntok.models.tokenizer import AlignTokenizer
            self.model = AlignTokenizer.from_pretrained(self.folder).eval()

    def predict(self, context, model_input, params=None):
        if self.model is None:
            raise NotImplementedError(f"{self.folder}: a DiT export samples with `aligntok sample`, not pyfunc")
        import torch
        with torch.no_grad():
            return self.model.encode(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


mlflow.models.set_model(ExportedModel())
