"""The MLServer part of bench/mlserver_bench.py: a custom MLServer runtime, imported by MLServer in its own venv.

MLServer is never a project dependency and has no TFLite runtime of its own, so this is the runtime
a user would write: one interpreter (``num_threads=1``), the input quantized with the model's own
scale and zero point, ``invoke``, the output dequantized. ``mlserver_bench.py`` copies this file next
to the model's ``model-settings.json`` (``"implementation": "mlserver_side.TFLiteRuntime"``).
"""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

try:
    from tflite_runtime.interpreter import Interpreter
except ImportError:  # Pythons without a tflite-runtime wheel
    from ai_edge_litert.interpreter import Interpreter


class TFLiteRuntime(MLModel):
    """One int8 TFLite model with one float input and one float output."""

    async def load(self) -> bool:
        uri = self.settings.parameters.uri if self.settings.parameters else None
        if not uri:
            raise ValueError("model-settings.json needs parameters.uri: the .tflite file")
        self._interp = Interpreter(model_path=uri, num_threads=1)
        self._interp.allocate_tensors()
        self._in = self._interp.get_input_details()[0]
        self._out = self._interp.get_output_details()[0]
        self._rows = int(self._in["shape"][0])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        scale, zero = self._in["quantization"]
        info = np.iinfo(self._in["dtype"])
        q = np.clip(np.round(x / scale + zero), info.min, info.max).astype(self._in["dtype"])
        if q.shape[0] != self._rows:
            self._interp.resize_tensor_input(self._in["index"], list(q.shape))
            self._interp.allocate_tensors()
            self._rows = q.shape[0]
        self._interp.set_tensor(self._in["index"], q)
        self._interp.invoke()
        out_scale, out_zero = self._out["quantization"]
        y = (self._interp.get_tensor(self._out["index"]).astype(np.float32) - out_zero) * out_scale
        name = self.settings.outputs[0].name if self.settings.outputs else "output_0"
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(name, y)])
