"""simulate-traffic's shifted scenario: review-sized sentences of any corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmops.errors import DataError
from lmops.simulate import corpus_sentences

pytestmark = pytest.mark.code


def test_a_corpus_without_review_sized_sentences_is_one_clear_error(tmp_path: Path) -> None:
    """A user's corpus of only very short lines."""
    (tmp_path / "tiny.txt").write_text("ok\nno\nfine.\n", "utf-8")
    with pytest.raises(DataError, match=r"tiny.txt has no sentence of 10-200 characters"):
        corpus_sentences("tiny.txt", 5, seed=0, root=tmp_path)
    (tmp_path / "plots.txt").write_text("A man walks in. He sits down, 3.5 metres away.\n", "utf-8")
    # Latin sentences split where a space follows the stop; "3.5" stays whole.
    assert sorted(set(corpus_sentences("plots.txt", 4, seed=0, root=tmp_path))) == [
        "A man walks in.",
        "He sits down, 3.5 metres away.",
    ]
