"""Small models for the digits (8x8x1) studies, shared by the experiment scripts."""

from __future__ import annotations

import flax.linen as nn


class CNN(nn.Module):
    """3x3 conv 16 -> 2x2 avg-pool -> 3x3 conv 32 -> dense 64 -> dense 10 (XLA:CPU's
    convolution backward pass makes wider CNNs slow to train on CPU)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(32, (3, 3), name="conv2")(x))
        x = nn.relu(nn.Dense(64, name="fc")(x.reshape(x.shape[0], -1)))
        return nn.Dense(10, name="head")(x)


class MLP(nn.Module):
    """Flattened 8x8 image -> ``hidden`` ReLU layers (``fc1``, ``fc2``, ...) -> dense 10 (``head``)."""

    hidden: tuple[int, ...] = (256, 128)

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"fc{i + 1}")(x))
        return nn.Dense(10, name="head")(x)
