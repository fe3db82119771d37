"""The data-set readers fed mutated CIFAR pickles, .npz archives and images: each gives
samples (N, C, H, W) float32 in [0, 1] with labels in range, or a DataError naming the
file, within the deadline."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from fuzzkit import FUZZ, fresh_dir
from hypothesis import given
from hypothesis import strategies as st
from mutations import mutate_bytes
from PIL import Image

from edge_runtime.datasets import read_dataset
from edge_runtime.errors import DataError


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets")


def _valid(data) -> None:
    for part in (data.train, data.test):
        if part is None:
            continue
        assert part.x.ndim == 4 and part.x.dtype == np.float32 and len(part.x) == len(part.y)
        assert np.isfinite(part.x).all() and 0.0 <= part.x.min() and part.x.max() <= 1.0
        assert 0 <= part.y.min() and part.y.max() < len(data.classes)


def _cifar_bytes() -> bytes:
    rng = np.random.default_rng(0)
    record = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(v) for v in rng.integers(0, 10, 2)],
        b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
        b"filenames": [b"a.png", b"b.png"],
    }
    return pickle.dumps(record, protocol=2)


def _npz_bytes() -> bytes:
    out = io.BytesIO()
    x = np.random.default_rng(0).random((3, 1, 2, 2)).astype(np.float32)
    np.savez(out, x=x, y=np.array([0, 1, 2]), classes=np.array(["a", "b", "c"]))
    return out.getvalue()


def _image_bytes(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (6, 5), (200, 30, 90)).save(out, format=fmt)
    return out.getvalue()


def test_a_cifar_batch_gives_samples_or_a_data_error_naming_it(fuzz, scratch):
    rec = fuzz("CIFAR batch (pickle)", DataError)
    base = _cifar_bytes()

    @FUZZ
    @given(content=st.just(base) | mutate_bytes(base))
    def case(content):
        folder = fresh_dir(scratch)
        (folder / "data_batch_1").write_bytes(content)
        outcome = rec.call(read_dataset, folder)
        if outcome.accepted:
            _valid(outcome.value)
        else:
            assert "data_batch_1" in str(outcome.error)

    case()
    rec.assert_both_outcomes()


def test_an_npz_gives_samples_or_a_data_error_naming_it(fuzz, scratch):
    rec = fuzz("data set (.npz)", DataError)
    base = _npz_bytes()

    @FUZZ
    @given(content=st.just(base) | mutate_bytes(base))
    def case(content):
        path = fresh_dir(scratch) / "d.npz"
        path.write_bytes(content)
        outcome = rec.call(read_dataset, path)
        if outcome.accepted:
            _valid(outcome.value)
        else:
            assert str(path) in str(outcome.error)

    case()
    rec.assert_both_outcomes()


def test_an_image_folder_gives_samples_or_a_data_error_naming_the_image(fuzz, scratch):
    rec = fuzz("image folder (PNG/JPEG)", DataError)
    bases = {".png": _image_bytes("PNG"), ".jpg": _image_bytes("JPEG")}

    @FUZZ
    @given(suffix=st.sampled_from(sorted(bases)), data=st.data())
    def case(suffix, data):
        base = bases[suffix]
        content = data.draw(st.just(base) | mutate_bytes(base))
        root = fresh_dir(scratch)
        (root / "cls").mkdir()
        (root / "cls" / f"img{suffix}").write_bytes(content)
        outcome = rec.call(read_dataset, root, size=4)
        if outcome.accepted:
            _valid(outcome.value)
            assert outcome.value.train.x.shape == (1, 3, 4, 4)
        else:
            assert f"img{suffix}" in str(outcome.error)

    case()
    rec.assert_both_outcomes()
