"""Data loaders: digits / digits32 splits, determinism, shapes, missing-data errors, registry."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from admm_compress import data


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_digits_sizes_and_stratified_split():
    tr, te = data.digits(batch_size=100, test_fraction=0.2)
    n_tr, n_te = len(tr.dataset), len(te.dataset)
    assert n_tr + n_te == 1797
    assert n_te == int(np.ceil(0.2 * 1797))
    _, y_full = load_digits(return_X_y=True)
    y_tr, y_te = _all(tr)[1], _all(te)[1]
    full = np.bincount(y_full, minlength=10)
    assert np.array_equal(np.bincount(y_tr.numpy(), minlength=10)
                          + np.bincount(y_te.numpy(), minlength=10), full)
    # stratified: each class's test share is within one sample of the proportional share
    expected = full * n_te / 1797
    assert np.all(np.abs(np.bincount(y_te.numpy(), minlength=10) - expected) <= 1)


def test_digits_split_is_a_partition_of_the_real_images():
    tr, te = data.digits(batch_size=2000, seed=3)
    x_tr, y_tr = _all(tr)
    x_te, y_te = _all(te)
    # x = (raw - m) / s is affine with s > 0 and raw = pixel / 16 spans [0, 1] in the train split
    lo, hi = x_tr.min(), x_tr.max()
    recovered = torch.round((torch.cat([x_tr, x_te]) - lo) / (hi - lo) * 16).to(torch.int64)
    labels = torch.cat([y_tr, y_te])
    x_full, y_full = load_digits(return_X_y=True)
    got = sorted(tuple(r) + (int(t),) for r, t in zip(recovered.tolist(), labels.tolist()))
    want = sorted(tuple(int(v) for v in r) + (int(t),) for r, t in zip(x_full, y_full))
    assert got == want                                  # same images with the same labels


def test_digits_normalized_with_training_statistics():
    tr, _ = data.digits(batch_size=500)
    x = _all(tr)[0]
    assert abs(float(x.mean())) < 1e-4
    assert abs(float(x.std()) - 1.0) < 1e-3


def test_digits_flat_and_image_shapes_hold_the_same_values():
    tr_f, te_f = data.digits(batch_size=16, flat=True, seed=1)
    tr_i, te_i = data.digits(batch_size=16, flat=False, seed=1)
    xf, yf = next(iter(te_f))
    xi, yi = next(iter(te_i))
    assert xf.shape == (16, 64) and xi.shape == (16, 1, 8, 8)
    assert torch.equal(xf, xi.reshape(16, 64)) and torch.equal(yf, yi)
    assert next(iter(tr_f))[0].dtype == torch.float32 and yf.dtype == torch.int64


def test_digits_reproducible_and_seed_dependent():
    a = [b for b in data.digits(batch_size=64, seed=0)[0]]
    b = [b for b in data.digits(batch_size=64, seed=0)[0]]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    c = next(iter(data.digits(batch_size=64, seed=1)[0]))
    assert not torch.equal(a[0][0], c[0])
    # the shuffle differs between epochs of one loader (generator advances), same for both runs
    tr1, _ = data.digits(batch_size=64, seed=0)
    tr2, _ = data.digits(batch_size=64, seed=0)
    e1 = [next(iter(tr1))[1] for _ in range(2)]
    e2 = [next(iter(tr2))[1] for _ in range(2)]
    assert not torch.equal(e1[0], e1[1])
    assert torch.equal(e1[0], e2[0]) and torch.equal(e1[1], e2[1])


def test_digits32_shape_channels_and_labels():
    tr, te = data.digits32(batch_size=32, seed=0)
    x, y = next(iter(te))
    assert x.shape == (32, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    _, te8 = data.digits(batch_size=32, seed=0)
    assert torch.equal(y, next(iter(te8))[1])          # same split as digits
    xt = _all(tr)[0]
    assert torch.allclose(xt.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert len(tr.dataset) + len(te.dataset) == 1797


def test_digits32_is_bilinear_upsampling_of_digits():
    # undo normalizations; upsampled image averaged back over 4x4 blocks ~ the 8x8 image ordering
    _, te8 = data.digits(batch_size=8, flat=False, seed=0)
    _, te32 = data.digits32(batch_size=8, seed=0)
    x8 = next(iter(te8))[0]
    x32 = next(iter(te32))[0][:, :1]
    up = torch.nn.functional.interpolate(x8, size=(32, 32), mode="bilinear", align_corners=False)
    # both are affine images of the same upsampled raw digits: correlation 1 per sample
    for a, b in zip(up.flatten(1), x32.flatten(1)):
        c = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert c > 0.9999


@pytest.mark.parametrize("fn,folder", [(data.cifar10, "cifar-10-batches-py"),
                                       (data.cifar100, "cifar-100-python"),
                                       (data.mnist, "MNIST")])
def test_missing_dataset_error_names_folder_and_download_flag(tmp_path, fn, folder):
    with pytest.raises(data.DatasetNotFoundError) as e:
        fn(root=tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / folder) in msg
    assert "download=True" in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, RuntimeError)
    assert list(tmp_path.iterdir()) == []              # nothing created, nothing downloaded


def test_corrupted_cifar_folder_is_reported(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="corrupted"):
        data.cifar10(root=tmp_path)


@pytest.mark.parametrize("kwargs,exc,word", [
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"batch_size": 2.5}, TypeError, "batch_size"),
    ({"test_fraction": 1.0}, ValueError, "test_fraction"),
    ({"test_fraction": 0.0}, ValueError, "test_fraction"),
    ({"test_fraction": 0.001}, ValueError, "test_fraction"),
    ({"flat": "yes"}, TypeError, "flat"),
    ({"seed": -1}, ValueError, "seed"),
    ({"num_workers": -1}, ValueError, "num_workers"),
])
def test_digits_validates_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        data.digits(**kwargs)


def test_cifar_validates_before_touching_disk(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        data.cifar10(root=tmp_path, batch_size=0)
    with pytest.raises(TypeError, match="download"):
        data.cifar10(root=tmp_path, download="no")


def test_synthetic_shapes_and_determinism():
    tr, te = data.synthetic(shape=(3, 8, 8), num_classes=4, n=20, batch_size=8, seed=5)
    x, y = next(iter(te))
    assert x.shape == (8, 3, 8, 8) and y.min() >= 0 and y.max() < 4
    assert len(tr.dataset) == len(te.dataset) == 20
    tr2, _ = data.synthetic(shape=(3, 8, 8), num_classes=4, n=20, batch_size=8, seed=5)
    assert torch.equal(_all(tr)[0], _all(tr2)[0])
    with pytest.raises(ValueError, match="shape"):
        data.synthetic(shape=(3, 0))


def test_registry_and_info():
    assert set(data.DATASETS) == {"digits", "digits32", "cifar10", "cifar100", "mnist", "synthetic"}
    tr, _ = data.get_loaders("digits", batch_size=10)
    assert next(iter(tr))[0].shape == (10, *data.info("digits").input_size)
    assert data.info("digits", flat=False).input_size == (1, 8, 8)
    assert data.info("cifar100").num_classes == 100
    with pytest.raises(ValueError) as e:
        data.get_loaders("imagenet")
    for name in data.DATASETS:
        assert name in str(e.value)
