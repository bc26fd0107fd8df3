"""Baselines trained by the same trainer as ORGaNICs: an MLP (static MNIST) and an LSTM (sequential MNIST)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from .cell import check_sequence

__all__ = ["LSTMClassifier", "MLP"]


class MLP(nn.Module):
    """Multilayer perceptron with ReLU hidden units: ``784-300-100-10`` by default.

    Parameters
    ----------
    input_size : int
        Input dimension.
    hidden_sizes : sequence of int
        Units of each hidden layer.
    num_classes : int
        Number of logits.
    """

    def __init__(self, input_size: int = 784, hidden_sizes: Sequence[int] = (300, 100), num_classes: int = 10) -> None:
        super().__init__()
        sizes = [input_size, *hidden_sizes]
        blocks: list[nn.Module] = []
        for i, o in pairwise(sizes):
            blocks += [nn.Linear(i, o), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(sizes[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for a batch ``x`` (B, input_size)."""
        return self.net(x)


class LSTMClassifier(nn.Module):
    """``nn.LSTM`` (batch first) over the sequence and a linear readout of the final hidden state.

    Parameters
    ----------
    input_size : int
        Dimension of each input x_t.
    hidden_size : int
        LSTM units.
    num_classes : int
        Number of logits.
    """

    def __init__(self, input_size: int = 1, hidden_size: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.readout = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, num_classes) for input sequences x of shape (batch, T, input_size)."""
        check_sequence(x, self.lstm.input_size)
        _, (h, _) = self.lstm(x)
        return self.readout(h[-1])
