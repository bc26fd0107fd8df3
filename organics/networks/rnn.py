"""The ORGaNICs RNN sequence classifier: the cell run over a sequence, read out from the final y.

:class:`ORGaNICsRNN` runs :class:`~organics.networks.cell.ORGaNICsCell` over a batch-first input
sequence and reads the logits out linearly from the final principal-neuron state ``y_T``
(the paper's sequential-MNIST model, Table 2). Two implementations compute the same function
and the same gradients (tested equal):

- ``impl="loop"``: one call of the readable cell per step, plain autograd;
- ``impl="scan"``: :func:`organics.networks.scan.organics_scan`, the whole sequence as one
  autograd node with hand-written backpropagation through time (engines ``"torch"``,
  ``"numba"``, ``"triton"`` and ``"persistent"``, and ``"resident"``, equal to half precision).

``impl="auto"`` takes the scan wherever it supports the input (float32 and float64) and the
loop otherwise. :func:`classify_together` runs several independent models side by side, their
scans in one kernel launch where the engine allows and, on a GPU, the launches on CUDA streams of
their own if asked (the GPU relay trains Table 2 this way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_count
from .cell import ORGaNICsCell, cell_options, check_sequence
from .scan import ENGINES, RNNTrajectory, organics_scan, organics_scan_runs, supports

__all__ = ["IMPLEMENTATIONS", "ORGaNICsRNN", "classify_together"]

IMPLEMENTATIONS = ("auto", "loop", "scan")


class ORGaNICsRNN(nn.Module):
    """Sequence classifier: an :class:`~organics.networks.cell.ORGaNICsCell` run over the input, read out linearly
    from the final y.

    Parameters
    ----------
    input_size : int
        Dimension of each input x_t (1 for sequential MNIST).
    hidden_size : int
        Number of principal neurons (128 in the paper's Table 2).
    num_classes : int
        Number of logits.
    preset : {"original", "paper"}
        The cell's configuration (:data:`organics.networks.cell.PRESETS`).
    impl : {"auto", "loop", "scan"}
        How the recurrence runs (see the module docstring).
    engine : {"auto", "torch", "numba", "triton", "persistent", "resident"}
        Engine of the scan (:func:`organics.networks.scan.organics_scan`).
    **options
        Any :class:`~organics.networks.cell.CellOptions` field, overriding the preset's value
        (e.g. ``rectified=True`` or ``step_sizes="fixed"``).
    """

    def __init__(
        self,
        input_size: int = 1,
        hidden_size: int = 128,
        num_classes: int = 10,
        *,
        preset: str = "original",
        impl: str = "auto",
        engine: str = "auto",
        **options: Any,
    ) -> None:
        super().__init__()
        check_count("num_classes", num_classes)
        self.cell = ORGaNICsCell(input_size, hidden_size, cell_options(preset, **options))
        self.readout = nn.Linear(hidden_size, num_classes)
        self.impl = impl
        self.engine = engine

    @property
    def impl(self) -> str:
        """How the recurrence runs ("auto", "loop" or "scan")."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        check_choice("impl", value, IMPLEMENTATIONS)
        self._impl = value

    @property
    def engine(self) -> str:
        """The scan's engine (one of :data:`organics.networks.scan.ENGINES`), checked when set."""
        return self._engine

    @engine.setter
    def engine(self, value: str) -> None:
        check_choice("engine", value, ENGINES)
        self._engine = value

    def _use_scan(self, x: torch.Tensor) -> bool:
        if self.impl == "scan":
            if not supports(x):
                raise ValueError(f"impl='scan' needs float32 or float64 input, got {x.dtype}")
            return True
        return self.impl == "auto" and supports(x)

    def run(self, x: torch.Tensor, return_trajectory: bool = False) -> tuple[torch.Tensor, RNNTrajectory | None]:
        """Final ``y`` (batch, n) after the whole sequence and, if asked, the trajectory of y and a.

        Parameters
        ----------
        x : torch.Tensor, shape (batch, T, input_size)
            Batch-first input sequences, any length T >= 1.
        return_trajectory : bool
            Also return :class:`~organics.networks.scan.RNNTrajectory` with y and a after each input, shape
            (batch, T, n).
        """
        check_sequence(x, self.cell.input_size)
        if self._use_scan(x):
            return organics_scan(self.cell, x, return_trajectory, engine=self.engine)
        state = self.cell.initial_state(x.shape[0])
        ys, as_ = [], []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            if return_trajectory:
                ys.append(state.y)
                as_.append(state.a)
        trajectory = RNNTrajectory(torch.stack(ys, 1), torch.stack(as_, 1)) if return_trajectory else None
        return state.y, trajectory

    def forward(
        self, x: torch.Tensor, return_trajectory: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, RNNTrajectory]:
        """Logits (batch, num_classes) from the final y; with the trajectory if ``return_trajectory``."""
        y, trajectory = self.run(x, return_trajectory)
        logits = self.readout(y)
        return (logits, trajectory) if return_trajectory else logits


def classify_together(
    models: Sequence[nn.Module], xs: Sequence[torch.Tensor], streams: bool = False
) -> list[torch.Tensor]:
    """The logits of several independent models, ``models[i](xs[i])``, their recurrences run side by side.

    ORGaNICs RNNs that take the scan with the same engine, hidden size and input shape share
    one call of :func:`organics.networks.scan.organics_scan_runs` (with the persistent engine:
    one kernel launch per direction for all of them); every other model is called on its own.
    Values and gradients are those of the separate calls.

    With ``streams`` on a GPU, each of these calls runs on a CUDA stream of its own, so that
    their kernels can run at the same time: at Table 2's batch of 256 a launch of four runs
    fills 64 of an H100's 132 multiprocessors, and on one stream the next launch waits for it.
    The caller's stream waits for every side stream before the logits are returned, and
    autograd runs each backward kernel on its forward's stream. The arithmetic is the same; on
    the CPU ``streams`` changes nothing.
    """
    calls: list[tuple[list[int], Any]] = []  # (the models a call computes, the call)
    groups: dict[tuple, list[int]] = {}
    for i, (model, x) in enumerate(zip(models, xs, strict=True)):
        if isinstance(model, ORGaNICsRNN) and model._use_scan(x):
            check_sequence(x, model.cell.input_size)
            key = (model.engine, model.cell.hidden_size, model.cell.rectified, x.shape, x.dtype, x.device)
            groups.setdefault(key, []).append(i)
        else:
            calls.append(([i], lambda i=i: [models[i](xs[i])]))
    for (engine, *_), members in groups.items():

        def scan_call(members: list[int] = members, engine: str = engine) -> list[torch.Tensor]:
            ys = organics_scan_runs([models[i].cell for i in members], [xs[i] for i in members], engine=engine)
            return [models[i].readout(y) for i, y in zip(members, ys, strict=True)]

        calls.append((members, scan_call))
    logits: list[torch.Tensor | None] = [None] * len(models)
    on_streams = streams and len(calls) > 1 and all(x.is_cuda for x in xs)
    caller = torch.cuda.current_stream(xs[0].device) if on_streams else None
    for members, call in calls:
        if caller is None:
            outputs = call()
        else:
            side = torch.cuda.Stream(xs[0].device)
            side.wait_stream(caller)  # the inputs and the parameters as the caller's stream left them
            for i in members:
                xs[i].record_stream(side)  # not reused for the caller's tensors while the side stream reads it
            with torch.cuda.stream(side):
                outputs = call()
            for out in outputs:
                out.record_stream(caller)
            caller.wait_stream(side)
        for i, out in zip(members, outputs, strict=True):
            logits[i] = out
    return logits
