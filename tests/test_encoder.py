"""The embedded sentence encoder: loads offline from its PyPI package and embeds sensibly."""

from __future__ import annotations

import numpy as np
import pytest

from mycelium.encoder import embed_texts, load_encoder
from mycelium.errors import ModelError

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("embedded:all-minilm-l6-v2", MAX_LENGTH)


def test_embeddings_are_unit_vectors_of_the_model_width(encoder):
    vectors = embed_texts(encoder, ["48 / 2 = 24", "She sold half as many clips in May."], batch_size=2, progress=False)
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_similar_steps_are_closer_than_unrelated_text(encoder):
    texts = [
        "Natalia sold 48 clips in April and half as many in May.",
        "Natalia sold 48 clips in April, and in May she sold half of that.",
        "The derivative of sin(x) is cos(x).",
    ]
    a, b, c = embed_texts(encoder, texts, batch_size=3, progress=False)
    assert a @ b > a @ c + 0.2


def test_batching_does_not_change_the_result(encoder):
    texts = ["12 * 5 = 60", "a much longer sentence about how many apples remain in the basket after lunch", "7"]
    together = embed_texts(encoder, texts, batch_size=3, progress=False)
    one_by_one = embed_texts(encoder, texts, batch_size=1, progress=False)
    assert np.allclose(together, one_by_one, atol=1e-5)


def test_unknown_encoders_fail_in_one_line(tmp_path):
    with pytest.raises(ModelError, match="unknown embedded encoder"):
        load_encoder("embedded:nope", MAX_LENGTH)
    with pytest.raises(ModelError, match="no such model folder"):
        load_encoder(str(tmp_path / "absent"), MAX_LENGTH)
