"""The torch-free readers of users' data sets, on small files written here: image folders
(PNG/JPEG of several sizes and modes), CIFAR python batches and .npz, and broken ones,
whose errors name the file."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.datasets import load_eval_set, read_dataset
from edge_runtime.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]


def _tree(root: Path, spec: dict[str, list[tuple[str, tuple[int, int], str]]]) -> Path:
    """``spec``: class -> [(mode, (w, h), suffix)]; pixels from a fixed generator."""
    rng = np.random.default_rng(0)
    for label, images in spec.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, (mode, size, suffix) in enumerate(images):
            rgb = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            img = Image.fromarray(rgb)
            img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
            img.save(root / label / f"{i}{suffix}")
    return root


def test_an_image_folder_reads_classes_sorted_resized_and_in_range(tmp_path):
    root = _tree(
        tmp_path / "tree",
        {
            "zebra": [("RGB", (40, 30), ".jpg"), ("RGBA", (64, 64), ".png")],
            "ant": [("L", (17, 17), ".png"), ("P", (32, 32), ".png")],
            "moth": [("I;16", (33, 50), ".png"), ("CMYK", (20, 20), ".jpg")],
        },
    )
    (root / "ant" / "notes.txt").write_text("not an image: ignored")

    data = read_dataset(root, size=16)

    assert data.format == "folder" and data.test is None
    assert data.classes == ("ant", "moth", "zebra")  # sorted, as torchvision's ImageFolder
    assert data.train.x.shape == (6, 3, 16, 16) and data.train.x.dtype == np.float32
    assert 0.0 <= data.train.x.min() and data.train.x.max() <= 1.0
    assert data.train.y.tolist() == [0, 0, 1, 1, 2, 2]


def test_grey_images_read_as_one_channel_and_a_grey_pixel_keeps_its_value(tmp_path):
    root = tmp_path / "grey"
    for label, value in (("dark", 51), ("light", 204)):
        (root / label).mkdir(parents=True)
        Image.new("L", (10, 10), value).save(root / label / "a.png")
        Image.new("L", (12, 12), value).save(root / label / "b.png")

    data = read_dataset(root)

    assert data.train.x.shape == (4, 1, 10, 10)  # the shorter side of the commonest size
    assert np.allclose(data.train.x[:2], 0.2) and np.allclose(data.train.x[2:], 0.8)


def test_a_train_test_tree_keeps_its_own_held_out_part(tmp_path):
    spec = {"a": [("RGB", (8, 8), ".png")] * 2, "b": [("RGB", (8, 8), ".png")]}
    _tree(tmp_path / "t" / "train", spec)
    _tree(tmp_path / "t" / "val", {"b": [("RGB", (8, 8), ".png")]})

    data = read_dataset(tmp_path / "t")

    assert data.classes == ("a", "b")
    assert len(data.train.y) == 3 and data.test.y.tolist() == [1]
    assert load_eval_set(tmp_path / "t")[1].tolist() == [1]


def _cifar_batch(path: Path, n: int, *, key: str = "labels", seed: int = 0, **extra) -> Path:
    rng = np.random.default_rng(seed)
    record = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"batch_label": b"x"}
    record[key.encode()] = [int(v) for v in rng.integers(0, 10, n)]
    record.update(extra)
    with path.open("wb") as f:
        pickle.dump(record, f, protocol=2)  # the CIFAR files are Python 2 pickles
    return path


def test_cifar10_batches_read_channel_major_with_their_class_names(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    first = _cifar_batch(folder / "data_batch_1", 5, seed=1)
    _cifar_batch(folder / "data_batch_2", 3, seed=2)
    _cifar_batch(folder / "test_batch", 4, seed=3)
    names = [f"c{i}".encode() for i in range(10)]
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": 5}, f, protocol=2)

    data = read_dataset(folder)

    with first.open("rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert data.format == "cifar" and data.classes == tuple(f"c{i}" for i in range(10))
    assert data.train.x.shape == (8, 3, 32, 32) and data.test.x.shape == (4, 3, 32, 32)
    # row = 1024 red, then 1024 green, then 1024 blue, each row-major
    assert data.train.x[0, 1, 0, 5] == pytest.approx(raw[b"data"][0, 1024 + 5] / 255)
    assert data.train.y[:5].tolist() == raw[b"labels"]
    assert load_eval_set(folder)[0].shape == (4, 3, 32, 32)  # a device evaluates on the test


def test_cifar100_reads_fine_labels_and_names(tmp_path):
    _cifar_batch(tmp_path / "train", 6, key="fine_labels", coarse_labels=[0] * 6)
    _cifar_batch(tmp_path / "test", 2, key="fine_labels")
    names = [f"n{i}" for i in range(100)]
    with (tmp_path / "meta").open("wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["x"] * 20}, f)

    data = read_dataset(tmp_path)

    assert len(data.classes) == 100 and data.classes[7] == "n7"
    assert len(data.train.y) == 6 and len(data.test.y) == 2


class _Boom:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_cifar_pickle_with_any_other_global_is_refused_without_running_it(tmp_path, capsys):
    _cifar_batch(tmp_path / "data_batch_1", 2, evil=_Boom())

    with pytest.raises(DataError, match=r"data_batch_1: .*refused global \w+\.print"):
        read_dataset(tmp_path)
    assert "code ran" not in capsys.readouterr().out


def test_npz_reads_x_y_and_class_names(tmp_path):
    x = np.random.default_rng(0).random((6, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]), classes=["a", "b", "c"])
    np.savez(tmp_path / "u8.npz", x=(x * 255).astype(np.uint8), y=np.zeros(6, np.int64))

    data = read_dataset(tmp_path / "d.npz")
    bytes_ = read_dataset(tmp_path / "u8.npz")

    assert data.classes == ("a", "b", "c") and np.array_equal(data.train.x, x)
    assert bytes_.train.x.max() <= 1.0 and bytes_.classes == ("0",)


def _broken_npz(tmp_path: Path) -> list[tuple[Path, str]]:
    x = np.zeros((4, 1, 4, 4), np.float32)
    cases = {
        "no-y.npz": ({"x": x}, "needs arrays 'x' and 'y'"),
        "mismatch.npz": ({"x": x, "y": np.zeros(3, int)}, "x has 4 samples and y has 3"),
        "dims.npz": ({"x": x.reshape(4, 16), "y": np.zeros(4, int)}, r"\(N, C, H, W\)"),
        "nan.npz": ({"x": x + np.nan, "y": np.zeros(4, int)}, "non-finite"),
        "labels.npz": ({"x": x, "y": np.zeros(4)}, "1-D integer"),
        "names.npz": ({"x": x, "y": np.arange(4), "classes": ["a"]}, "only 1 class names"),
        "empty.npz": ({"x": x[:0], "y": np.zeros(0, int)}, "need equal, > 0"),
    }
    out = []
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        out.append((tmp_path / name, message))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    out.append((tmp_path / "junk.npz", "not a readable .npz"))
    return out


def test_broken_npz_files_name_the_file_and_what_is_wrong(tmp_path):
    for path, message in _broken_npz(tmp_path):
        with pytest.raises(DataError, match=message) as info:
            read_dataset(path)

        assert str(path) in str(info.value)


def test_broken_folders_and_pickles_name_the_file(tmp_path):
    _tree(tmp_path / "t", {"a": [("RGB", (8, 8), ".png")]})
    (tmp_path / "t" / "b").mkdir()
    (tmp_path / "u" / "a").mkdir(parents=True)
    (tmp_path / "u" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "one.png")
    (tmp_path / "c").mkdir()
    with (tmp_path / "c" / "data_batch_1").open("wb") as f:
        pickle.dump({b"labels": [1, 2]}, f)
    (tmp_path / "d").mkdir()
    _cifar_batch(tmp_path / "d" / "data_batch_1", 3)
    (tmp_path / "d" / "test_batch").write_bytes(b"\x80\x02garbage")
    cases = [
        (tmp_path / "t", "t/b: no images"),
        (tmp_path / "u", "bad.jpg: not a readable image"),
        (tmp_path / "flat", "flat: no class sub-folders"),
        (tmp_path / "c", "data_batch_1: no 'data'"),
        (tmp_path / "d", "test_batch: not a readable CIFAR pickle"),
        (tmp_path / "missing", "missing: no such file"),
    ]
    for path, message in cases:
        with pytest.raises(DataError, match=message):
            read_dataset(path)


def test_a_data_error_is_a_config_error_and_exits_with_the_config_code():
    from eclm.exits import exit_code_for
    from eclm_common.exit_codes import ExitCode

    assert issubclass(DataError, ConfigError)
    assert exit_code_for(DataError("x")) == ExitCode.CONFIG


def test_without_pillow_an_image_folder_says_to_install_it_and_npz_still_reads(tmp_path):
    _tree(tmp_path / "t", {"a": [("RGB", (8, 8), ".png")]})
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1, 2, 2), np.float32), y=np.zeros(2, int))
    code = (
        "import sys; sys.modules['PIL'] = None\n"
        "from edge_runtime.datasets import read_dataset\n"
        "from edge_runtime.errors import DataError\n"
        f"print(read_dataset({str(tmp_path / 'd.npz')!r}).train.x.shape)\n"
        f"try:\n    read_dataset({str(tmp_path / 't')!r})\n"
        "except DataError as e:\n    print(e)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )

    shape, message, torch = done.stdout.strip().splitlines()
    assert shape == "(2, 1, 2, 2)"
    assert "needs Pillow" in message and "pip install Pillow" in message
    assert torch == "[]"
