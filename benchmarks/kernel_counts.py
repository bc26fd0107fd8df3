"""Count what the persistent kernels issue per step at several commits, compiled for an H100 by this machine's Triton.

For each git revision, that revision's own ``organics`` package (``git archive``) compiles its
kernels in a fresh process with its own ``organics.networks.scan.persistent_kernel_resources``
(Triton's CUDA compiler, no GPU needed): shared memory, registers and stack, and per step of the
loop, per warp, the instructions, barriers, tensor-core instructions and spill accesses. The
compiler matters: the GPU windows compile with the Triton of the machine's image (3.6 in
November 2026), which may lay a kernel out differently from the Triton installed here, so run
the script with the Triton whose counts you want (in a virtual environment with that version)::

    python benchmarks/kernel_counts.py --revisions 0da13b1 HEAD
    python benchmarks/kernel_counts.py --revisions HEAD --hidden-sizes 128 --precisions fp16

It writes ``kernel_counts_triton<version>.json`` (the revisions' commits, the counts, the
machine) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from io import BytesIO
from pathlib import Path

from organics.benchmark import machine, write_record

REPOSITORY = Path(__file__).resolve().parents[1]

COUNT = """
import json, sys
from organics.networks.scan import persistent_kernel_resources
sizes, precisions = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({p: {n: persistent_kernel_resources(n, p) for n in sizes} for p in precisions}))
"""


def git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, check=True).stdout


def counts(revision: str, hidden_sizes: list[int], precisions: list[str]) -> dict:
    """The revision's kernels compiled by its own ``persistent_kernel_resources``, in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        with tarfile.open(fileobj=BytesIO(git("archive", "--format=tar", revision, "organics"))) as tar:
            tar.extractall(folder, filter="data")
        result = subprocess.run(
            [sys.executable, "-c", COUNT, json.dumps(hidden_sizes), json.dumps(precisions)],
            cwd=folder, env={**os.environ, "PYTHONPATH": folder}, capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{revision}: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", nargs="+", default=["HEAD"], help="git revisions (default: HEAD)")
    parser.add_argument("--hidden-sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--precisions", nargs="+", default=["fp16", "tf32"], choices=["fp16", "tf32", "ieee"])
    parser.add_argument("--out", default="results/benchmarks", help="folder of the JSON file")
    args = parser.parse_args(argv)
    triton = metadata.version("triton")
    record = {
        "date": datetime.now(timezone.utc).isoformat(),
        "command": "python benchmarks/kernel_counts.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "triton": triton,
        "capability": 90,
        "machine": machine("cpu"),
        "revisions": [
            {
                "revision": revision,
                "commit": git("rev-parse", revision).decode().strip(),
                "kernels": counts(revision, args.hidden_sizes, args.precisions),
            }
            for revision in args.revisions
        ],
    }
    write_record(record, Path(args.out) / f"kernel_counts_triton{triton}.json")
    return record


if __name__ == "__main__":
    main()
