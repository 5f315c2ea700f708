"""Hashed token n-grams: a TF-IDF + logistic-regression channel that lives inside the
classifier's own graph, computed from the same `input_ids` the transformer reads.

Why: on a CPU budget a from-scratch transformer and a bag of n-grams make different
mistakes, so their combination beats either (see README, "Recipes"). Serving keeps one
ONNX graph with the transformer's inputs; nothing outside the graph computes features.

The features are defined once here and computed twice with the same arithmetic: in numpy
(to fit the logistic regression with scikit-learn) and in torch (the exported graph).
For a text with valid tokens t_1..t_n (attention mask on, not [CLS]/[SEP]), every n-gram
of order 1..`order` hashes to a bucket b; the feature vector is
    x[b] = sum over occurrences of idf[b]  /  sqrt(sum over occurrences of idf[b]^2),
i.e. idf-weighted counts, normalised by a norm that needs no per-text aggregation (it is
the L2 norm whenever no n-gram repeats). Buckets seen in fewer than `min_df` training
texts have idf 0, so they neither score nor count in the norm.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _check(vocab_size: int, order: int) -> None:
    if vocab_size ** (order + 1) >= 2**62:
        raise ValueError(f"n-gram order {order} over a vocabulary of {vocab_size} overflows int64")


def bucket_ids(ids: np.ndarray, valid: np.ndarray, vocab_size: int, order: int, buckets: int):
    """Buckets of every n-gram (orders 1..order) of one padded batch, and their validity.

    `ids` and `valid` are (batch, length); returns two (batch, n_grams) arrays."""
    _check(vocab_size, order)
    codes, masks, offset = [], [], 0
    length = ids.shape[1]
    for k in range(1, order + 1):
        if length < k:
            break
        width = length - k + 1
        code = np.zeros((ids.shape[0], width), dtype=np.int64)
        ok = np.ones((ids.shape[0], width), dtype=bool)
        for j in range(k):
            code = code * vocab_size + ids[:, j : j + width]
            ok &= valid[:, j : j + width]
        codes.append((code + offset) % buckets)
        masks.append(ok)
        offset += vocab_size**k
    return np.concatenate(codes, axis=1), np.concatenate(masks, axis=1)


def feature_matrix(
    ids: list[list[int]], special: set[int], vocab_size: int, order: int, buckets: int, idf: Any
):
    """The sparse (texts x buckets) feature matrix; `idf` None gives raw presence counts."""
    from scipy.sparse import csr_matrix

    rows, cols, values = [], [], []
    for row, seq in enumerate(ids):
        arr = np.asarray(seq, dtype=np.int64)[None, :]
        valid = ~np.isin(arr, list(special))
        grams, ok = bucket_ids(arr, valid, vocab_size, order, buckets)
        grams = grams[ok]
        if idf is None:
            weight = np.ones(len(grams))
        else:
            weight = idf[grams]
            norm = np.sqrt((weight**2).sum())
            weight = weight / norm if norm > 0 else weight
        rows.append(np.full(len(grams), row))
        cols.append(grams)
        values.append(weight)
    return csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(ids), buckets),
    )


def fit_idf(
    ids: list[list[int]], special: set[int], vocab_size: int, order: int, buckets: int, min_df: int
) -> np.ndarray:
    """scikit-learn's smoothed idf per bucket; 0 where fewer than `min_df` texts have it."""
    presence = feature_matrix(ids, special, vocab_size, order, buckets, idf=None)
    presence.data[:] = 1.0
    presence.sum_duplicates()
    presence.data[:] = 1.0
    df = np.asarray(presence.sum(axis=0)).ravel()
    idf = np.log((1 + len(ids)) / (1 + df)) + 1.0
    idf[df < min_df] = 0.0
    return idf


def torch_ngrams(input_ids: Any, valid: Any, k: int, vocab_size: int) -> tuple[Any, Any]:
    """The n-grams of order k starting at each position (batch, length - k + 1), as exact
    mixed-radix codes, and whether all their tokens are valid."""
    import torch

    # Constant slice bounds (negative stops), so the exported graph takes any length.
    code = torch.zeros_like(input_ids[:, k - 1 :])
    ok = torch.ones_like(valid[:, k - 1 :])
    for j in range(k):
        stop = j - k + 1 or None
        code = code * vocab_size + input_ids[:, j:stop]
        ok = ok & valid[:, j:stop]
    return code, ok


def ngram_embedding(vocab_size: int, order: int, buckets: int, dim: int, out_dim: int) -> Any:
    """A torch module: (input_ids, attention_mask) -> (batch, length, dim), at each position
    the sum of hashed embeddings of the n-grams (orders 2..order) starting there.

    Added to the token embeddings, it hands a character-level model word-like units
    (fastText's bigrams, ZEN's n-grams). Zero-initialised: it starts as a no-op, so a
    pretrained encoder without it is unchanged until training moves it. The table is narrow
    (`dim`) and projected to the model's width: a wide one costs the optimiser more per step
    than the transformer itself on a CPU."""
    import torch

    _check(vocab_size, order)

    class HashedNgramEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Embedding(buckets, dim)
            self.project = torch.nn.Linear(dim, out_dim, bias=False)
            # A zero table, not a zero projection: each n-gram's row then grows from its own
            # gradient as it is seen (random rows would be noise the projection learns to fit).
            torch.nn.init.zeros_(self.table.weight)
            self.order, self.vocab_size = order, vocab_size

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            valid = attention_mask.bool()
            total, offset = None, vocab_size
            for k in range(2, self.order + 1):
                code, ok = torch_ngrams(input_ids, valid, k, self.vocab_size)
                vectors = self.table(torch.remainder(code + offset, buckets))
                vectors = vectors * ok.unsqueeze(-1).to(vectors.dtype)
                vectors = torch.nn.functional.pad(vectors, (0, 0, 0, k - 1))
                total = vectors if total is None else total + vectors
                offset += self.vocab_size**k
            return self.project(total)

    return HashedNgramEmbedding()


def ngram_module(
    weights: np.ndarray,
    idf: np.ndarray,
    bias: np.ndarray,
    vocab_size: int,
    order: int,
    special_ids: list[int],
) -> Any:
    """A torch module: (input_ids, attention_mask) -> the logistic regression's logits."""
    import torch

    _check(vocab_size, order)

    class HashedNgramLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # idf folded into the weights: one gather per n-gram for the score, one for the norm.
            self.register_buffer(
                "weight", torch.tensor(weights * idf[:, None], dtype=torch.float32)
            )
            self.register_buffer("idf_sq", torch.tensor(idf**2, dtype=torch.float32))
            self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32))
            self.register_buffer("special", torch.tensor(special_ids, dtype=torch.long))
            self.buckets, self.order, self.vocab_size = len(idf), order, vocab_size

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            valid = attention_mask.bool()
            for special in self.special:
                valid = valid & (input_ids != special)
            grams, masks, offset = [], [], 0
            for k in range(1, self.order + 1):
                code, ok = torch_ngrams(input_ids, valid, k, self.vocab_size)
                grams.append(torch.remainder(code + offset, self.buckets))
                masks.append(ok)
                offset += self.vocab_size**k
            bucket = torch.cat(grams, dim=1)
            keep = torch.cat(masks, dim=1).float()
            score = (self.weight[bucket] * keep.unsqueeze(-1)).sum(dim=1)
            norm = torch.sqrt((self.idf_sq[bucket] * keep).sum(dim=1, keepdim=True))
            return score / torch.clamp(norm, min=1e-6) + self.bias

    return HashedNgramLogits()


def fit_logistic(
    train_ids: list[list[int]],
    train_targets: np.ndarray,
    val_ids: list[list[int]],
    val_targets: np.ndarray,
    n_labels: int,
    special: set[int],
    vocab_size: int,
    order: int,
    buckets: int,
    min_df: int,
    Cs: list[float],
) -> dict[str, Any]:
    """Fit the channel's logistic regression, its C chosen by validation log-loss.

    Returns the (buckets x labels) weights, the idf, the bias, the chosen C and the
    validation probabilities (softmax of the logits the graph computes)."""
    from sklearn.linear_model import LogisticRegression

    idf = fit_idf(train_ids, special, vocab_size, order, buckets, min_df)
    x_train = feature_matrix(train_ids, special, vocab_size, order, buckets, idf)
    x_val = feature_matrix(val_ids, special, vocab_size, order, buckets, idf)
    best: dict[str, Any] | None = None
    for C in Cs:
        fitted = LogisticRegression(C=C, max_iter=3000).fit(x_train, train_targets)
        coef, intercept = fitted.coef_.T, fitted.intercept_
        if n_labels == 2:  # one score z: the logits (-z/2, z/2) give the same softmax
            coef, intercept = np.hstack([-coef / 2, coef / 2]), np.array([-1, 1]) * intercept / 2
        weights = np.zeros((buckets, n_labels))
        weights[:, fitted.classes_] = coef
        bias = np.full(n_labels, -30.0)  # a class absent from train is never predicted
        bias[fitted.classes_] = intercept
        logits = x_val @ weights + bias
        probs = softmax(logits)
        loss = log_loss(probs, val_targets)
        if best is None or loss < best["val_log_loss"]:
            best = {
                "C": C,
                "weights": weights,
                "bias": bias,
                "val_probs": probs,
                "val_log_loss": loss,
            }
    assert best is not None
    return {**best, "idf": idf}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def log_loss(probs: np.ndarray, targets: np.ndarray) -> float:
    picked = np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0)
    return float(-np.log(picked).mean())


def mix(transformer_probs: np.ndarray, ngram_probs: np.ndarray, weight: float) -> np.ndarray:
    """What the graph serves: softmax(w log p_transformer + (1 - w) log p_ngram)."""
    logs = weight * np.log(np.clip(transformer_probs, 1e-12, 1)) + (1 - weight) * np.log(
        np.clip(ngram_probs, 1e-12, 1)
    )
    return softmax(logs)
