"""Data loaders: embedded digits (offline), CIFAR-10/100 and MNIST (local copy), synthetic.

Every loader function returns ``(train_loader, test_loader)`` (:class:`torch.utils.data.DataLoader`).
The training loader shuffles with its own seeded :class:`torch.Generator`, so two calls with the
same ``seed`` yield the same batches in the same order; the test loader does not shuffle.

``digits`` / ``digits32``
    The 1797 8x8 handwritten digits bundled with scikit-learn
    (:func:`sklearn.datasets.load_digits`, no download), split by a stratified, seeded
    :func:`sklearn.model_selection.train_test_split`, scaled to zero mean and unit variance with
    statistics of the training split.  ``digits`` gives flat 64-vectors (or ``1 x 8 x 8``
    images); ``digits32`` upsamples the images bilinearly to ``32 x 32`` and repeats them over 3
    channels, so CIFAR-shaped models (ResNets, VGG, ViT) train on real data on a CPU.
``cifar10`` / ``cifar100``
    :mod:`torchvision.datasets` read from ``root``; training augmentation of the papers
    (random crop 32 with padding 4, horizontal flip), normalization by the data set's channel
    mean / std.  Nothing is downloaded unless ``download=True``; a missing data set raises
    :class:`DatasetNotFoundError` naming the folder expected and the ``download`` flag.
``mnist``
    :class:`torchvision.datasets.MNIST` from ``root`` (no augmentation: flips would change the
    digits), normalized with mean 0.1307 / std 0.3081, ``1 x 28 x 28`` or flat 784-vectors.
``synthetic``
    Gaussian inputs with uniform random labels, for throughput benchmarks.

``get_loaders(name, **kwargs)`` dispatches by name through :data:`DATASETS`; ``info(name, ...)``
gives the input size and the number of classes without loading anything.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ._validation import check_float, check_int

__all__ = ["digits", "digits32", "cifar10", "cifar100", "mnist", "synthetic", "get_loaders",
           "info", "DatasetInfo", "DATASETS", "DatasetNotFoundError", "CIFAR10_MEAN",
           "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "MNIST_MEAN", "MNIST_STD",
           "default_root"]

logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


class DatasetNotFoundError(FileNotFoundError, RuntimeError):
    """A data set is not on disk (and ``download=False``).

    Subclass of :class:`FileNotFoundError` and of :class:`RuntimeError` (what torchvision
    raises), so either ``except`` clause catches it.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """Shape of one input sample (no batch dimension) and number of classes."""

    input_size: tuple
    num_classes: int


# ----------------------------------------------------------------------------- checks
def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _check_common(batch_size, num_workers, seed) -> tuple[int, int, int]:
    return (check_int("batch_size", batch_size, low=1),
            check_int("num_workers", num_workers, low=0),
            check_int("seed", seed, low=0))


def _loaders(train_set, test_set, batch_size: int, num_workers: int, seed: int,
             pin_memory: bool = False):
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                       num_workers=num_workers, pin_memory=pin_memory,
                       persistent_workers=num_workers > 0)
    test = DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)
    return train, test


# ----------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = np.ascontiguousarray(x, dtype=np.float32) / 16.0   # pixel values 0..16 -> [0, 1]
    y = np.ascontiguousarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _digits_split(test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    x, y = _digits_arrays()
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction,
                                           random_state=seed, stratify=y)
    idx_train.sort()
    idx_test.sort()
    return (torch.from_numpy(x[idx_train]), torch.from_numpy(y[idx_train]),
            torch.from_numpy(x[idx_test]), torch.from_numpy(y[idx_test]))


def _check_fraction(test_fraction) -> float:
    test_fraction = check_float("test_fraction", test_fraction, low=0.0, high=1.0,
                                low_open=True, high_open=True)
    n, k = 1797, 10
    n_test = int(np.ceil(test_fraction * n))
    if n_test < k or n - n_test < k:
        raise ValueError(f"test_fraction={test_fraction} leaves {n_test} test / {n - n_test} "
                         f"training samples; each split needs at least one sample of each of the "
                         f"{k} classes, so use {k / n:.4f} <= test_fraction <= {1 - k / n:.4f}")
    return test_fraction


def digits(batch_size: int = 128, flat: bool = True, test_fraction: float = 0.2, seed: int = 0,
           num_workers: int = 0):
    """The scikit-learn 8x8 digits (1797 images, 10 classes), embedded — no download.

    Parameters
    ----------
    batch_size : int
        Samples per batch, >= 1.
    flat : bool
        ``True``: samples are 64-vectors; ``False``: ``1 x 8 x 8`` images.
    test_fraction : float
        Fraction of the samples held out, in ``(0, 1)`` (stratified by class).
    seed : int
        Seed of the split and of the training shuffle.
    num_workers : int
        DataLoader worker processes, >= 0.

    Returns
    -------
    (train_loader, test_loader)
        Inputs are ``(pixel / 16 - mean) / std`` with the training split's scalar mean / std.
    """
    batch_size, num_workers, seed = _check_common(batch_size, num_workers, seed)
    flat = _check_bool("flat", flat)
    test_fraction = _check_fraction(test_fraction)
    x_tr, y_tr, x_te, y_te = _digits_split(test_fraction, seed)
    mean, std = x_tr.mean(), x_tr.std()
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std
    if not flat:
        x_tr = x_tr.reshape(-1, 1, 8, 8)
        x_te = x_te.reshape(-1, 1, 8, 8)
    return _loaders(TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te), batch_size,
                    num_workers, seed)


def digits32(batch_size: int = 128, test_fraction: float = 0.2, seed: int = 0,
             num_workers: int = 0, size: int = 32):
    """The 8x8 digits upsampled to ``3 x size x size`` images (bilinear, channel-repeated).

    Same split, seeding and arguments as :func:`digits`; inputs are normalized per channel
    with the training split's mean / std after upsampling.  ``size`` (default 32) makes them
    CIFAR-shaped.
    """
    batch_size, num_workers, seed = _check_common(batch_size, num_workers, seed)
    test_fraction = _check_fraction(test_fraction)
    size = check_int("size", size, low=8)
    x_tr, y_tr, x_te, y_te = _digits_split(test_fraction, seed)

    def up(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.reshape(-1, 1, 8, 8), size=(size, size), mode="bilinear",
                          align_corners=False)
        return x.expand(-1, 3, -1, -1).contiguous()

    x_tr, x_te = up(x_tr), up(x_te)
    mean = x_tr.mean(dim=(0, 2, 3), keepdim=True)
    std = x_tr.std(dim=(0, 2, 3), keepdim=True)
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std
    return _loaders(TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te), batch_size,
                    num_workers, seed)


# ----------------------------------------------------------------------------- torchvision
def default_root() -> str:
    """``$ADMM_COMPRESS_DATA`` if set, else ``./data``."""
    return os.environ.get("ADMM_COMPRESS_DATA", "data")


def _check_root(root) -> Path:
    if root is None:
        root = default_root()
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
    return Path(root).expanduser()


def _not_found(title: str, fn: str, folder: Path, root: Path, detail: str = "") -> DatasetNotFoundError:
    extra = f" ({detail})" if detail else ""
    return DatasetNotFoundError(
        f"{title} not found{extra}: expected the folder '{folder}' under root='{root}'. "
        f"Pass download=True (admm_compress.data.{fn}(root='{root}', download=True), or the "
        f"CLI's --set download=true) to download it there, or set root= to a folder that holds it.")


def _torchvision_pair(cls, title: str, fn: str, subfolder: str, root, download, train_tf, test_tf):
    root = _check_root(root)
    download = _check_bool("download", download)
    folder = root / subfolder
    if not download and not folder.is_dir():
        raise _not_found(title, fn, folder, root)
    try:
        train_set = cls(str(root), train=True, transform=train_tf, download=download)
        test_set = cls(str(root), train=False, transform=test_tf, download=download)
    except RuntimeError as exc:
        if download:
            raise
        raise _not_found(title, fn, folder, root, f"missing or corrupted files: {exc}") from exc
    logger.info("%s: %d training / %d test samples from %s", title, len(train_set),
                len(test_set), folder)
    return train_set, test_set


def _cifar(cls, title, fn, subfolder, mean, std, root, batch_size, download, num_workers,
           augment, seed):
    from torchvision import transforms as T

    batch_size, num_workers, seed = _check_common(batch_size, num_workers, seed)
    augment = _check_bool("augment", augment)
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
                          if augment else []) + normalize)
    test_tf = T.Compose(normalize)
    train_set, test_set = _torchvision_pair(cls, title, fn, subfolder, root, download,
                                            train_tf, test_tf)
    return _loaders(train_set, test_set, batch_size, num_workers, seed,
                    pin_memory=torch.cuda.is_available())


def cifar10(root=None, batch_size: int = 128, download: bool = False, num_workers: int = 2,
            augment: bool = True, seed: int = 0):
    """CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision).

    Parameters
    ----------
    root : str or path, optional
        Folder that holds (or receives) ``cifar-10-batches-py``; default :func:`default_root`.
    batch_size : int
        Samples per batch, >= 1.
    download : bool
        Download into ``root`` when missing.  ``False`` (default) never touches the network and
        raises :class:`DatasetNotFoundError` if the data set is missing.
    num_workers : int
        DataLoader worker processes, >= 0.
    augment : bool
        Training augmentation of the papers: random crop 32 with padding 4, horizontal flip.
    seed : int
        Seed of the training shuffle; with ``num_workers > 0`` it also fixes the workers'
        augmentation streams (with ``num_workers=0`` augmentation draws from the global torch
        RNG, so seed that for reproducible crops and flips).
    """
    from torchvision.datasets import CIFAR10

    return _cifar(CIFAR10, "CIFAR-10", "cifar10", CIFAR10.base_folder, CIFAR10_MEAN, CIFAR10_STD,
                  root, batch_size, download, num_workers, augment, seed)


def cifar100(root=None, batch_size: int = 128, download: bool = False, num_workers: int = 2,
             augment: bool = True, seed: int = 0):
    """CIFAR-100 from ``root/cifar-100-python`` (torchvision); arguments as :func:`cifar10`."""
    from torchvision.datasets import CIFAR100

    return _cifar(CIFAR100, "CIFAR-100", "cifar100", CIFAR100.base_folder, CIFAR100_MEAN,
                  CIFAR100_STD, root, batch_size, download, num_workers, augment, seed)


class _Flatten:
    """Picklable ``tensor.flatten()`` transform."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten()


def mnist(root=None, batch_size: int = 128, flat: bool = False, download: bool = False,
          num_workers: int = 2, seed: int = 0):
    """MNIST from ``root/MNIST/raw`` (torchvision), normalized, no augmentation.

    ``flat=True`` gives 784-vectors (LoRITa's FCNs), else ``1 x 28 x 28`` images.  Other
    arguments as :func:`cifar10`.
    """
    from torchvision import transforms as T
    from torchvision.datasets import MNIST

    batch_size, num_workers, seed = _check_common(batch_size, num_workers, seed)
    flat = _check_bool("flat", flat)
    tf = [T.ToTensor(), T.Normalize(MNIST_MEAN, MNIST_STD)] + ([_Flatten()] if flat else [])
    tf = T.Compose(tf)
    train_set, test_set = _torchvision_pair(MNIST, "MNIST", "mnist", "MNIST/raw", root, download,
                                            tf, tf)
    return _loaders(train_set, test_set, batch_size, num_workers, seed,
                    pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------- synthetic
def synthetic(shape=(3, 32, 32), num_classes: int = 10, n: int = 512, batch_size: int = 128,
              seed: int = 0, num_workers: int = 0):
    """Standard-normal inputs of ``shape`` with uniform random labels (throughput benchmarks).

    Both loaders hold ``n`` samples, drawn from a generator seeded with ``seed`` (training set
    first, then test set).
    """
    batch_size, num_workers, seed = _check_common(batch_size, num_workers, seed)
    shape = _check_shape(shape)
    num_classes = check_int("num_classes", num_classes, low=1)
    n = check_int("n", n, low=1)
    g = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(2):
        x = torch.randn((n, *shape), generator=g)
        y = torch.randint(0, num_classes, (n,), generator=g)
        sets.append(TensorDataset(x, y))
    return _loaders(sets[0], sets[1], batch_size, num_workers, seed)


def _check_shape(shape) -> tuple:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)) or not shape:
        raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
    return tuple(check_int("shape entry", s, low=1) for s in shape)


# ----------------------------------------------------------------------------- registry
DATASETS: dict[str, Callable[..., tuple]] = {
    "digits": digits,
    "digits32": digits32,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "mnist": mnist,
    "synthetic": synthetic,
}


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown dataset name={name!r}; choose one of {sorted(DATASETS)}")
    return name


def get_loaders(name: str, **kwargs):
    """``DATASETS[name](**kwargs)``: ``(train_loader, test_loader)`` of a registered data set.

    Raises ``ValueError`` listing the valid names if ``name`` is unknown.
    """
    return DATASETS[_check_name(name)](**kwargs)


def info(name: str, flat: bool | None = None, shape=None, num_classes: int | None = None,
         size: int = 32) -> DatasetInfo:
    """Input size (no batch dimension) and number of classes of a registered data set.

    ``flat`` applies to ``digits`` (default ``True``) and ``mnist`` (default ``False``);
    ``shape`` / ``num_classes`` to ``synthetic``; ``size`` to ``digits32``.  Loads nothing.
    """
    name = _check_name(name)
    if name == "digits":
        return DatasetInfo((64,) if flat in (None, True) else (1, 8, 8), 10)
    if name == "digits32":
        return DatasetInfo((3, size, size), 10)
    if name == "cifar10":
        return DatasetInfo((3, 32, 32), 10)
    if name == "cifar100":
        return DatasetInfo((3, 32, 32), 100)
    if name == "mnist":
        return DatasetInfo((784,) if flat else (1, 28, 28), 10)
    return DatasetInfo(_check_shape((3, 32, 32) if shape is None else shape),
                       10 if num_classes is None else check_int("num_classes", num_classes, low=1))
