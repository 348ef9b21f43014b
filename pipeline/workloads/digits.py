"""Digits: a small CNN trained by the repo on scikit-learn's 1,797 real 8x8 handwritten digits.

The accuracy case: the data is real and labelled, so int8 loss shows up as lost top-1 points.
"""

from __future__ import annotations

import numpy as np

SEED = 20261121
TEST_FRACTION = 0.25


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): stratified, seeded; x is float32 [N,1,8,8] in [0,1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y
    )
    return x_train, y_train, x_test, y_test
