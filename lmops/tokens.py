"""Token files: texts tokenized once, chunk by chunk, into flat shards of token ids (uint16
while the vocabulary fits, uint32 beyond) and read back through memory maps, as nanoGPT's
`train.bin` is, with a typed manifest (`TokenManifest`). Pretraining cuts its windows out
of them, so its memory is set by the shard and chunk sizes, not by the corpus.

Each document is followed by the separator token, and a window never crosses a shard:
with one shard the windows are exactly the old in-memory packing's rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmops.artifacts import CorruptArtifact, TokenManifest, TokenShard
from lmops.atomic import atomic_dir
from lmops.errors import DataError

SHARD_TOKENS = 1 << 24  # 32 MB of uint16 a shard
TEXT_CHUNK = 2048  # documents read and encoded at a time


def dtype_for(vocab_size: int) -> str:
    """The narrowest unsigned type that holds every token id of the vocabulary."""
    if vocab_size <= np.iinfo(np.uint16).max + 1:
        return "uint16"
    if vocab_size <= np.iinfo(np.uint32).max + 1:
        return "uint32"
    raise DataError(f"a vocabulary of {vocab_size:,} tokens does not fit uint32 token files")


def parquet_texts(paths: Iterable[Path], chunk: int = TEXT_CHUNK) -> Iterator[list[str]]:
    """The `text` column of each table in turn, `chunk` rows at a time (never a whole
    table in memory)."""
    import pyarrow.parquet as pq

    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk, columns=["text"]):
            yield batch.column("text").to_pylist()


def write(
    chunks: Iterable[list[str]],
    tokenizer: Any,
    out_dir: Path,
    tokenizer_sha256: str,
    shard_tokens: int = SHARD_TOKENS,
) -> TokenManifest:
    """Tokenize every chunk of documents into `out_dir` (replaced only when all of it is
    written: a failure, a full disk included, leaves no half-written shard behind)."""
    vocab_size, separator = len(tokenizer), tokenizer.sep_token_id
    dtype = np.dtype(dtype_for(vocab_size))
    shards: list[TokenShard] = []
    pending: list[np.ndarray] = []
    pending_tokens = documents = 0
    with atomic_dir(out_dir) as scratch:

        def flush(tokens: np.ndarray) -> None:
            name = f"tokens-{len(shards):05d}.bin"
            tokens.tofile(scratch / name)
            shards.append(
                TokenShard(file=name, tokens=len(tokens), sha256=hashlib.sha256(tokens).hexdigest())
            )

        for texts in chunks:
            # The backend directly: documents are longer than a window on purpose here.
            encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
            documents += len(encoded)
            flat = np.fromiter(
                (token for e in encoded for token in (*e.ids, separator)), dtype=dtype
            )
            pending.append(flat)
            pending_tokens += len(flat)
            while pending_tokens >= shard_tokens:
                stream = np.concatenate(pending)
                flush(stream[:shard_tokens])
                pending = [stream[shard_tokens:]]
                pending_tokens = len(pending[0])
        if pending_tokens:
            flush(np.concatenate(pending))
        manifest = TokenManifest(
            dtype=dtype.name,
            vocab_size=vocab_size,
            separator=separator,
            documents=documents,
            tokens=sum(s.tokens for s in shards),
            tokenizer_sha256=tokenizer_sha256,
            shards=shards,
        )
        manifest.write(scratch / TokenManifest.FILE)
    return manifest


class Windows:
    """Rows of `seq_len` ids, `[CLS] + seq_len - 2 consecutive tokens + [SEP]`, numbered
    shard after shard. Only the rows asked for are read from the memory maps."""

    def __init__(self, token_dir: Path, seq_len: int, cls: int, sep: int, tokenizer_sha256: str):
        try:
            self.manifest = TokenManifest.of(token_dir)
        except CorruptArtifact as err:
            raise DataError(f"token files: {err}") from None
        if self.manifest.tokenizer_sha256 != tokenizer_sha256:
            raise DataError(
                f"{token_dir}: token files of another tokenizer; delete them to tokenize again"
            )
        dtype = np.dtype(self.manifest.dtype)
        if self.manifest.vocab_size > np.iinfo(dtype).max + 1:
            raise DataError(
                f"{token_dir}: a vocabulary of {self.manifest.vocab_size:,} tokens outgrows "
                f"{dtype.name} token files"
            )
        self.dtype = dtype
        self.shards = [token_dir / s.file for s in self.manifest.shards]
        for path, shard in zip(self.shards, self.manifest.shards, strict=True):
            self._check(path, dtype, shard.tokens)
        self.body, self.seq_len, self.cls, self.sep = seq_len - 2, seq_len, cls, sep
        per_shard = [s.tokens // self.body for s in self.manifest.shards]
        self.starts = np.cumsum([0, *per_shard])

    @staticmethod
    def _check(path: Path, dtype: np.dtype, tokens: int) -> None:
        size = path.stat().st_size if path.is_file() else None
        if size != tokens * dtype.itemsize:
            found = "missing" if size is None else f"{size:,} bytes"
            raise DataError(
                f"{path}: a torn token shard ({found}; its manifest says {tokens:,} "
                f"{dtype.name} tokens, {tokens * dtype.itemsize:,} bytes)"
            )

    def _map(self, shard: int, start: int = 0, count: int | None = None) -> np.memmap:
        """A map of `count` tokens of one shard from `start`, made per read and dropped
        after it (as nanoGPT does): pages a long run touched stay in the page cache, not in
        the process's resident memory."""
        tokens = self.manifest.shards[shard].tokens
        count = tokens - start if count is None else count
        offset = start * self.dtype.itemsize
        return np.memmap(self.shards[shard], self.dtype, mode="r", offset=offset, shape=(count,))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, indices: Iterable[int]) -> Any:
        """The rows at `indices`, as a LongTensor of shape (len(indices), seq_len)."""
        import torch

        wanted = np.asarray(list(indices), dtype=np.int64)
        out = np.empty((len(wanted), self.seq_len), dtype=np.int64)
        out[:, 0], out[:, -1] = self.cls, self.sep
        shards = np.searchsorted(self.starts, wanted, side="right") - 1
        for row, (index, shard) in enumerate(zip(wanted, shards, strict=True)):
            start = int(index - self.starts[shard]) * self.body
            out[row, 1:-1] = self._map(int(shard), start, self.body)
        return torch.from_numpy(out)

    def digest(self) -> str:
        """What the windows are cut from: changed data never resumes a stale checkpoint."""
        joined = ",".join(s.sha256 for s in self.manifest.shards) + f"/{self.seq_len}"
        return hashlib.sha256(joined.encode()).hexdigest()

    def token_counts(self, vocab_size: int, chunk: int = 1 << 22) -> np.ndarray:
        """How often each id occurs in the windows' bodies (the [CLS]/[SEP] they add aside),
        counted a chunk at a time."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for shard, (start, end) in enumerate(zip(self.starts[:-1], self.starts[1:], strict=True)):
            used = int(end - start) * self.body
            for begin in range(0, used, chunk):
                part = self._map(shard, begin, min(chunk, used - begin))
                counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
                del part
        return counts
