"""The exported Triton model repository is checked, not only written: every config.pbtxt
parses with the protobuf definitions tritonclient ships and names the ONNX graph's own
inputs and outputs, and the text-in ensemble (tokenizer step, then the ONNX model) gives
the labels `lmops serve`'s engine gives, on the whole test split.

No Triton server runs here. The ensemble is executed as Triton would execute it: the
tokenizer step's model.py, the file Triton's Python backend loads, run through a
stand-in for `triton_python_backend_utils` (the three names it uses, per Triton's Python
backend API), then the step's outputs fed to the ONNX model by ONNX Runtime."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import tritonclient
from google.protobuf import text_format

from lmops.engine import Engine

pytestmark = pytest.mark.conformance


def _model_config_pb2() -> types.ModuleType:
    """tritonclient's ModelConfig definitions (loaded alone: its grpc package needs grpcio)."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def repository(tiny_export: Callable[[int], Path]) -> Path:
    return tiny_export(0).parent / "triton"


@pytest.fixture(scope="module")
def configs(repository: Path) -> dict[str, object]:
    pb2 = _model_config_pb2()
    return {
        path.parent.name: text_format.Parse(path.read_text("utf-8"), pb2.ModelConfig())
        for path in sorted(repository.glob("*/config.pbtxt"))
    }


def test_configs_parse_and_match_the_onnx_graph(repository: Path, configs: dict) -> None:
    assert set(configs) == {"lmops", "lmops_tokenizer", "lmops_text"}
    session = ort.InferenceSession(str(repository / "lmops" / "1" / "model.onnx"))
    onnx_model = configs["lmops"]
    assert [i.name for i in onnx_model.input] == [i.name for i in session.get_inputs()]
    assert [o.name for o in onnx_model.output] == [o.name for o in session.get_outputs()]
    for output, graph_output in zip(onnx_model.output, session.get_outputs(), strict=True):
        assert list(output.dims) == list(graph_output.shape[1:])  # batch dim is Triton's
    tokenizer, ensemble = configs["lmops_tokenizer"], configs["lmops_text"]
    assert tokenizer.backend == "python" and (repository / "lmops_tokenizer/1/model.py").is_file()
    assert [o.name for o in tokenizer.output] == [i.name for i in onnx_model.input]
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["lmops_tokenizer", "lmops"]
    assert dict(steps[0].input_map) == {"TEXT": "TEXT"}
    assert set(steps[1].input_map) == {i.name for i in onnx_model.input}
    assert {o.name for o in ensemble.output} == set(steps[1].output_map.values())
    for name in configs:
        assert (repository / name / "1").is_dir()


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Response:
    def __init__(self, output_tensors: list[_Tensor]) -> None:
        self.output_tensors = output_tensors


def _tokenizer_step(repository: Path, configs: dict) -> object:
    """Load the step's model.py as Triton's Python backend does, and initialize it."""
    from google.protobuf import json_format

    sys.modules["triton_python_backend_utils"] = types.SimpleNamespace(
        Tensor=_Tensor,
        InferenceResponse=_Response,
        get_input_tensor_by_name=lambda request, name: request[name],
    )
    path = repository / "lmops_tokenizer" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("lmops_tokenizer_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    step = module.TritonPythonModel()
    config = json_format.MessageToDict(configs["lmops_tokenizer"], preserving_proto_field_name=True)
    step.initialize({"model_config": json.dumps(config)})
    return step


def test_the_text_ensemble_gives_the_serving_engines_labels(
    repository: Path, configs: dict, tiny_export: Callable[[int], Path], tiny_validated: Path
) -> None:
    texts = pd.read_parquet(tiny_validated / "test.parquet")["text"].tolist()
    step = _tokenizer_step(repository, configs)
    session = ort.InferenceSession(str(repository / "lmops" / "1" / "model.onnx"))
    labels = (repository / "lmops_text" / "labels.txt").read_text("utf-8").split()
    got = []
    for start in range(0, len(texts), 16):  # Triton hands the step batches of requests
        batch = texts[start : start + 16]
        request = {"TEXT": _Tensor("TEXT", np.array([t.encode() for t in batch], dtype=object))}
        (response,) = step.execute([request])
        feed = {t.name(): t.as_numpy() for t in response.output_tensors}
        logits = session.run(["logits"], feed)[0]
        got.extend(labels[i] for i in logits.argmax(axis=1))
    engine = Engine(tiny_export(0), require_gpu=False, max_batch_size=32, variant="fp32")
    assert got == [p.label for p in engine.predict(texts)]
