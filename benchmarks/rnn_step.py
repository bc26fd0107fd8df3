"""Time one training step (forward + backward) of the ORGaNICs RNN (impl "loop" and "scan") and of nn.LSTM.

The contestants of :mod:`organics.benchmark` (by default ``"loop"``, ``"scan"``, ``"lstm"``;
``"scan-numba"`` etc. for one engine of the scan; hidden size n, one input per step, 10 logits)
run in the same process on the same batch, interleaved, repeat after repeat; the script reports
the median time of each and the ratios to nn.LSTM, and writes them with a description of the
machine to a JSON file, ``rnn_training_step_<device>.json`` in ``--out`` (by default
``results/benchmarks/rnn_step``: the files of the same name directly in ``results/benchmarks``,
which chapter 7 reads, are the committed first CPU run of this script and the GPU relay's latest
window, and are replaced only on purpose, by ``--out results/benchmarks``)::

    python benchmarks/rnn_step.py                       # CPU (and CUDA if present), default shapes
    python benchmarks/rnn_step.py --shapes 256x784 64x100 --repeats 5 --threads 1
    python benchmarks/rnn_step.py --shapes 256x784 --hidden-size 64 128 --preset paper \\
        --models scan-torch scan-numba lstm --out results/benchmarks/cpu_engines
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from organics.benchmark import CONTESTANTS, benchmark, machine, write_record
from organics.networks.cell import PRESETS


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["256x784", "256x100", "64x100"], help="BATCHxT")
    parser.add_argument("--hidden-size", nargs="+", type=int, default=[128], help="one or more n")
    parser.add_argument("--models", nargs="+", default=list(CONTESTANTS), help="contestants (default: %(default)s)")
    parser.add_argument("--preset", default="original", choices=sorted(PRESETS), help="the ORGaNICs cell")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if available")
    parser.add_argument("--out", default="results/benchmarks/rnn_step", help="folder of the JSON file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        for shape, n in ((shape, n) for shape in args.shapes for n in args.hidden_size):
            batch, T = map(int, shape.split("x"))
            row = benchmark(batch, T, n, device, args.repeats, models=tuple(args.models), preset=args.preset)
            rows.append(row)
            ratios = ", ".join(f"{k}/lstm = {v:.2f}" for k, v in row.get("ratio_to_lstm", {}).items())
            times = ", ".join(f"{k} {v['median']:.3f} s" for k, v in row["seconds"].items())
            print(f"{device} batch {batch} T {T} n {n}: {times}; {ratios}", flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "date": datetime.now(timezone.utc).isoformat(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(device),
            "results": [r for r in rows if r["device"] == device],
        }
        write_record(record, out / f"rnn_training_step_{device}.json")
    return rows


if __name__ == "__main__":
    main()
