"""The tokenizer step of the exported Triton repository: Triton's Python backend runs this
file as `lmops_tokenizer/1/model.py`, so that the ensemble `lmops_text` takes raw text
as `lmops serve` does. It tokenises exactly as lmops/engine.py does (the exported
tokenizer.json, truncation at model.max_length, [PAD] to the longest text of the request).

Not imported by lmops: `triton_python_backend_utils` exists only inside Triton, whose
Python environment needs `tokenizers` (`pip install tokenizers` in the Triton image).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        max_length = int(config["parameters"]["max_length"]["string_value"])
        self.tokenizer = Tokenizer.from_file(str(Path(__file__).parent / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]")

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
            encodings = self.tokenizer.encode_batch(texts)
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("input_ids", ids),
                        pb_utils.Tensor("attention_mask", mask),
                    ]
                )
            )
        return responses
