"""What ``--data`` reads on the cloud: built-in names, users' files with a stratified
held-out split, the RGB digits, the record stored with a model, and the shifted domains
on RGB images."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from cloud_trainer.errors import ConfigError
from cloud_trainer.model.data import load_digits_split
from cloud_trainer.model.datasets import describe, load_model_split, load_split
from cloud_trainer.model.domains import DOMAINS, apply
from cloud_trainer.model.rgbdigits import make_rgb_digits, write_rgb_digits
from eclm.cli import main
from eclm_common.exit_codes import ExitCode
from edge_runtime.datasets import read_dataset
from edge_runtime.errors import DataError


def _colour_folder(root, classes=("blue", "green", "red"), per_class=6, size=(20, 16)):
    """Images whose class is their dominant colour, so one epoch can learn something."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., 2 - c] += 180  # blue, green, red: channel 2, 1, 0
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_without_data_digits_stay_the_default():
    default, digits = load_split(None, seed=3), load_digits_split(seed=3)

    assert np.array_equal(default.x_train, digits.x_train)
    assert default.channels == 1 and default.image_size == 8 and default.num_classes == 10


def test_a_folder_without_a_test_part_gets_a_stratified_held_out_split(tmp_path):
    root = _colour_folder(tmp_path / "colours", per_class=10)

    split = load_split(root, seed=0, image_size=12)

    assert split.x_train.shape[1:] == (3, 12, 12) and split.classes == ("blue", "green", "red")
    assert np.bincount(split.y_test).tolist() == [3, 3, 3]  # 30% of 10 per class
    assert split.source == str(root.resolve())


def test_other_data_is_resized_and_grey_repeated_into_colour_for_the_network(tmp_path):
    x = np.random.default_rng(0).random((12, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "grey.npz", x=x, y=np.arange(12) % 3)

    split = load_split(tmp_path / "grey.npz", image_size=8, channels=3)

    assert split.x_train.shape[1:] == (3, 8, 8) and split.x_test.shape[1:] == (3, 8, 8)
    assert np.array_equal(split.x_train[:, 0], split.x_train[:, 2])
    with pytest.raises(ConfigError, match="has 3 channels, 1 asked for"):
        load_split("rgb-digits", channels=1)


def test_a_class_of_one_sample_cannot_be_held_out_and_says_which(tmp_path):
    x = np.zeros((5, 1, 4, 4), np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 0, 1, 1, 2]), classes=["a", "b", "lone"])

    with pytest.raises(ConfigError, match=r"d.npz: class 'lone' has 1 sample"):
        load_split(tmp_path / "d.npz")


def test_the_rgb_digits_are_reproducible_3x32x32_and_keep_the_digit_labels():
    x, y = make_rgb_digits(seed=0)
    again, _ = make_rgb_digits(seed=0)
    other, _ = make_rgb_digits(seed=1)

    assert x.shape == (1797, 3, 32, 32) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(x, again) and not np.array_equal(x, other)
    assert np.array_equal(y, load_digits().target)  # digit i of sklearn is image i
    # colour, not grey: the channels of a photo patch differ
    assert np.abs(x[:, 0] - x[:, 1]).mean() > 0.02


def test_the_rgb_digits_written_as_a_folder_or_npz_read_back(tmp_path):
    x, y = make_rgb_digits(seed=2)

    folder = read_dataset(write_rgb_digits(tmp_path / "rgb", fmt="folder", seed=2))
    npz = read_dataset(write_rgb_digits(tmp_path / "rgb.npz", fmt="npz", seed=2))

    assert np.array_equal(npz.train.x, x) and np.array_equal(npz.train.y, y)
    order = np.argsort(y, kind="stable")  # the folder lists class by class, in file order
    assert np.array_equal(folder.train.y, y[order])
    assert np.abs(folder.train.x - x[order]).max() <= 0.5 / 255 + 1e-6  # 8-bit PNGs
    assert load_split("rgb-digits").x_train.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (5, 3, 32, 32), (5, 3, 24, 16)])
@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_every_domain_shifts_any_channels_and_size_and_keeps_the_shape(domain, shape):
    x = np.random.default_rng(0).random(shape).astype(np.float32)

    shifted = apply(domain, x, seed=1)

    assert shifted.shape == shape and shifted.dtype == np.float32
    assert 0.0 <= shifted.min() and shifted.max() <= 1.0
    assert (domain == "clean") == np.array_equal(shifted, x)


def test_occlusion_scales_with_the_image_and_blanks_every_channel():
    small = apply("occlude", np.ones((2, 1, 8, 8), np.float32))
    large = apply("occlude", np.ones((2, 3, 32, 32), np.float32))

    assert (small == 0).sum(axis=(1, 2, 3)).tolist() == [9, 9]  # 3x3, as before
    assert (large == 0).sum(axis=(1, 2, 3)).tolist() == [3 * 144] * 2  # 12x12 per channel


def test_the_data_record_reloads_the_split_the_model_was_trained_on(tmp_path):
    root = _colour_folder(tmp_path / "colours")
    split = load_split(root, seed=4)
    model = tmp_path / "model"
    model.mkdir()
    (model / "metrics.json").write_text(json.dumps({"seed": 4, "data": describe(split, seed=4)}))

    again = load_model_split(model)

    assert np.array_equal(again.x_test, split.x_test) and again.classes == split.classes


def test_cloud_train_with_data_trains_on_a_folder_and_stores_its_description(tmp_path, capsys):
    root = _colour_folder(tmp_path / "colours")
    out = tmp_path / "model"

    code = main(["cloud", "train", "--data", str(root), "--epochs", "1", "--out", str(out)])

    printed = capsys.readouterr()
    assert code == ExitCode.OK, printed.err
    assert f"data: {root}, 3x8x8, 3 classes" in printed.out  # the digits preset's input
    metrics = json.loads((out / "metrics.json").read_text())
    data = metrics["data"]
    assert data["classes"] == ["blue", "green", "red"] and data["channels"] == 3
    assert data["image_size"] == 8 and len(data["mean"]) == len(data["std"]) == 3
    assert metrics["spec"]["in_channels"] == 3 and metrics["spec"]["num_classes"] == 3
    with np.load(out / "test.npz") as held_out:
        assert held_out["x"].shape == (data["test_samples"], 3, 8, 8)
    again = load_model_split(out)
    with np.load(out / "test.npz") as held_out:
        assert np.array_equal(again.x_test, held_out["x"])
        assert np.array_equal(again.y_test, held_out["y"])


def test_cloud_train_on_a_broken_file_exits_with_the_config_code_naming_it(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 1, 4, 4), np.float32))

    code = main(["cloud", "train", "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG
    assert "bad.npz: needs arrays 'x' and 'y'" in err and "Traceback" not in err


def test_data_errors_are_the_edge_tree_not_a_plain_value_error(tmp_path):
    with pytest.raises(DataError):
        load_split(tmp_path / "nothing-here")
