"""The inference engine: the exported tokenizer and an ONNX Runtime session.

The provider list is CUDA then CPU; ONNX Runtime falls back to CPU silently when the CUDA
libraries are missing, so the provider really in use is read back from the session.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmops.artifacts import CorruptArtifact, ExportManifest
from lmops.errors import LmopsError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# A session run keeps at least this share of its tokens real (the rest is padding).
PADDING_EFFICIENCY = 0.8


class CorruptModel(LmopsError):
    """The export's files are not the ones its manifest names (a partial or damaged copy)."""


class ExplainRefused(LmopsError):
    """A text too long to explain within serve.explain.max_tokens (the caller's error)."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    probabilities: dict[str, float]
    # The engine that computed it: after a hot swap, answers still say which model gave them.
    model_version: str


class Engine:
    """Tokenise, pad per length bucket, run the session, softmax."""

    def __init__(
        self,
        model_dir: Path,
        require_gpu: bool,
        max_batch_size: int,
        threads: int = 0,
        version: str | None = None,
        variant: str | None = None,
    ) -> None:
        """`version` labels answers and metrics (a registry version such as "v0.0.3"); by
        default it is the served variant file's sha256[:12]. `variant` (fp32, int8, fp16)
        overrides the manifest's recommendation for the provider."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if not (model_dir / ExportManifest.FILE).is_file():
            raise LmopsError(f"no exported model in {model_dir} (run the export stage first)")
        try:
            self.manifest = ExportManifest.of(model_dir)
        except CorruptArtifact as err:
            raise CorruptModel(str(err)) from None
        self.labels: list[str] = self.manifest.labels
        # Calibration (lmops/calibration.py): scores are softmax(logits / temperature).
        self.temperature = self.manifest.temperature
        self.max_length: int = self.manifest.max_length
        self.max_batch_size = max_batch_size
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer" / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        self.pad_id = self.tokenizer.token_to_id("[PAD]")

        # onnxruntime-gpu lists CUDA even where its libraries are missing; the session
        # then falls back to CPU (and ORT prints a page of errors, silenced here).
        ort.set_default_logger_severity(4)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Idle ORT threads spin by default, taking the cores the event loop needs to parse
        # requests and write answers.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        cuda_listed = CUDA in ort.get_available_providers()
        forced = variant
        variant = forced or self.manifest.recommended[CUDA if cuda_listed else CPU]
        self.session = self._session(
            model_dir, variant, options, [CUDA, CPU] if cuda_listed else [CPU]
        )
        self.providers: list[str] = self.session.get_providers()
        if cuda_listed and CUDA not in self.providers:
            log.warning(
                "engine: the CUDA provider could not load (CUDA/cuDNN libraries "
                "missing?); ONNX Runtime runs on %s",
                self.providers,
            )
            cpu_variant = forced or self.manifest.recommended[CPU]
            if cpu_variant != variant:
                variant = cpu_variant
                self.session = self._session(model_dir, variant, options, [CPU])
                self.providers = self.session.get_providers()
        self.variant = variant
        self.version = version or self.manifest.version_id(variant)
        log.info("engine: %s variant of %s on %s", variant, model_dir, self.providers)
        if require_gpu and CUDA not in self.providers:
            raise LmopsError(
                f"serve.require_gpu is true but ONNX Runtime runs on {self.providers}: the CUDA "
                "provider is missing or its libraries (CUDA, cuDNN) could not be loaded"
            )

    def _session(self, model_dir: Path, variant: str, options: Any, providers: list[str]) -> Any:
        """A session over the variant's file, refused unless its bytes are the ones the
        export checked for parity (a truncated copy can still parse as a model)."""
        import onnxruntime as ort

        entry = self.manifest.variants[variant]
        path = model_dir / entry.file
        model = path.read_bytes()
        if hashlib.sha256(model).hexdigest() != entry.sha256:
            raise CorruptModel(
                f"{path} does not match the sha256 in its manifest.json (corrupt or partly "
                "copied): refusing to serve it"
            )
        return ort.InferenceSession(model, options, providers=providers)

    @property
    def device(self) -> str:
        return "cuda" if CUDA in self.providers else "cpu"

    def _session_run(self, ids: list[list[int]], names: list[str]) -> list[np.ndarray]:
        """Pad `ids` to their longest and run the session for the outputs `names`."""
        width = max(len(seq) for seq in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return self.session.run(names, {"input_ids": input_ids, "attention_mask": mask})

    def score_ids(self, ids: list[list[int]]) -> np.ndarray:
        """Calibrated class probabilities of token-id sequences, in one session run."""
        return _softmax(self._session_run(ids, ["logits"])[0] / self.temperature)

    def _chunks(self, lengths: list[int]) -> list[list[int]]:
        """Indexes sorted by length, cut so that padding stays under a fifth of a run's
        tokens: on CPU, compute spent on padding is throughput lost."""
        chunks: list[list[int]] = []
        chunk: list[int] = []
        real = 0
        for index in sorted(range(len(lengths)), key=lengths.__getitem__):
            longest = lengths[index]
            padded = (len(chunk) + 1) * longest
            if chunk and (
                len(chunk) == self.max_batch_size or (real + longest) < PADDING_EFFICIENCY * padded
            ):
                chunks.append(chunk)
                chunk, real = [], 0
            chunk.append(index)
            real += longest
        return [*chunks, chunk] if chunk else chunks

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Class probabilities per text, computed in runs of similar length."""
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        probs = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for chunk in self._chunks([len(seq) for seq in ids]):
            probs[chunk] = self.score_ids([ids[i] for i in chunk])
        return probs

    def outputs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities and the pooled embedding per text, both from one session run
        per chunk (what the drift monitor compares)."""
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        width = next(o.shape[1] for o in self.session.get_outputs() if o.name == "embedding")
        probs = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        embeddings = np.zeros((len(texts), width), dtype=np.float32)
        for chunk in self._chunks([len(seq) for seq in ids]):
            logits, pooled = self._session_run([ids[i] for i in chunk], ["logits", "embedding"])
            probs[chunk] = _softmax(logits / self.temperature)
            embeddings[chunk] = pooled
        return probs, embeddings

    def predict(self, texts: list[str]) -> list[Prediction]:
        return [
            Prediction(
                label=self.labels[int(row.argmax())],
                score=float(row.max()),
                probabilities={label: float(p) for label, p in zip(self.labels, row, strict=True)},
                model_version=self.version,
            )
            for row in self.probabilities(texts)
        ]

    def explain(self, text: str, max_tokens: int) -> dict[str, Any]:
        """The prediction for `text` and one weight per token, by occlusion (lmops/explain.py)
        on this engine's own session: a text of n tokens costs one run of n+1 rows, so more
        than `max_tokens` tokens is refused before anything runs."""
        from lmops.explain import occlusion

        encoding = self.tokenizer.encode(text)
        special = {t for t, m in zip(encoding.ids, encoding.special_tokens_mask, strict=True) if m}
        # The whole text's tokens, not only the max_length the model reads (the rest
        # overflows): the limit is on what the caller sent.
        count = sum(
            len(e.ids) - sum(e.special_tokens_mask) for e in [encoding, *encoding.overflowing]
        )
        if count > max_tokens:
            raise ExplainRefused(
                f"the text has {count} tokens; explanations take at most {max_tokens} "
                "(serve.explain.max_tokens)"
            )
        found = occlusion(encoding.ids, special, self.score_ids)
        return {
            "label": self.labels[found.label],
            "score": found.score,
            "model_version": self.version,
            "truncated": bool(encoding.overflowing),
            "tokens": [
                {
                    "token": encoding.tokens[i],
                    "start": encoding.offsets[i][0],
                    "end": encoding.offsets[i][1],
                    "text": text[encoding.offsets[i][0] : encoding.offsets[i][1]],
                    "weight": round(float(weight), 5),
                }
                for i, weight in zip(found.positions, found.weights, strict=True)
            ],
        }

    def warm_up(self) -> None:
        self.predict(["warm-up", "预热文本"] * (self.max_batch_size // 2 or 1))
