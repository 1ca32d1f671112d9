"""scikit-learn's 8×8 handwritten digits: shipped inside the scikit-learn wheel, so it works offline.

1,797 images; pixel values 0..16 are rescaled to uint8 0..255 (round(v·255/16)). There is no official
split: a fixed stratified 80/20 split with ``random_state=0`` (``sklearn.model_selection.train_test_split``)
gives 1,437 training and 360 test images. The data root is not used.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from adaptive_dp.data.registry import DatasetInfo, register_dataset

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_TEST_FRACTION", "DIGIT_CLASSES"]

DIGIT_CLASSES = tuple(str(d) for d in range(10))
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.data.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    for array in (x_train, x_test, y_train, y_test):
        array.setflags(write=False)  # cached: load_dataset copies before handing out tensors
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


# Mean/std 0.3053/0.3759: computed over all 1,797 images after the uint8 rescaling.
@register_dataset(DatasetInfo("digits", 10, 1, 8, (0.3053,), (0.3759,), DIGIT_CLASSES))
def _read_digits(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    del root  # embedded in scikit-learn
    return _digits_split()[split]
