"""The scan computes exactly what the readable step loop computes: outputs and all gradients, for every engine."""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from helpers import perturbed_rnn

import organics.networks.scan as scan_module
from organics.networks.rnn import ORGaNICsRNN
from organics.networks.scan import (
    _Scan,
    _step_loop_counts,
    organics_scan,
    organics_scan_runs,
    persistent_kernel_resources,
    scan_inputs,
)

CELLS = {
    "main": {},
    "rectified": {"rectified": True},
    "paper": {"preset": "paper"},
    "paper, fixed time constants": {"preset": "paper", "step_sizes": "fixed"},
    "identity, signed, fixed sigma": {"recurrence": "identity", "drive": "signed", "learn_sigma": False},
}
"""Cell configurations every engine must compute exactly as the readable loop does."""

TOLERANCES = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 2e-4, "atol": 1e-5}}


def results(model, x, run):
    """Outputs and the gradients of every parameter and of x for a loss using the final y and the trajectory."""
    model.zero_grad()
    x = x.detach().requires_grad_(True)
    y, trajectory = run(x)
    loss = y.square().sum() + (trajectory.y.sin() * trajectory.a).sum() + trajectory.a.cos().sum()
    loss.backward()
    grads = {  # T = 1: the gains after the only step reach nothing, and the reference leaves their gradients None
        name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for name, p in model.named_parameters()
        if name.startswith("cell.")
    }
    return {"y": y.detach(), "Y": trajectory.y.detach(), "A": trajectory.a.detach(), "x": x.grad, **grads}


def loop(model):
    def run(x):
        model.impl = "loop"
        return model.run(x, return_trajectory=True)

    return run


def scan(model, engine="torch"):
    return lambda x: organics_scan(model.cell, x, return_trajectory=True, engine=engine)


def assert_same(expected, actual, dtype):
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **TOLERANCES[dtype], msg=name)


CPU_ENGINES = ("torch", "numba")


@pytest.mark.parametrize("engine", CPU_ENGINES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T", [1, 2, 30])
def test_scan_equals_loop(dtype, cell, T, engine):
    model = perturbed_rnn(dtype, **CELLS[cell])
    x = torch.randn(4, T, 2, dtype=dtype, generator=torch.Generator().manual_seed(T))
    assert_same(results(model, x, loop(model)), results(model, x, scan(model, engine)), dtype)


@pytest.mark.parametrize("engine", CPU_ENGINES)
@pytest.mark.parametrize("cell", CELLS)
def test_final_y_only_and_no_grad_paths(cell, engine):
    model = perturbed_rnn(torch.float64, **CELLS[cell])
    model.engine = engine
    x = torch.randn(3, 12, 2, dtype=torch.float64)
    grads = {}
    for impl in ("loop", "scan"):
        model.impl = impl
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        grads[impl] = [p.grad.clone() for p in model.parameters()]
    for g_ref, g_fast in zip(grads["loop"], grads["scan"], strict=True):
        torch.testing.assert_close(g_fast, g_ref, **TOLERANCES[torch.float64])
    with torch.no_grad():
        y_fast, tr_fast = organics_scan(model.cell, x, return_trajectory=True, engine=engine)
        model.impl = "loop"
        y_ref, tr_ref = model.run(x, return_trajectory=True)
    torch.testing.assert_close(y_fast, y_ref, **TOLERANCES[torch.float64])
    torch.testing.assert_close(tr_fast.a, tr_ref.a, **TOLERANCES[torch.float64])


def test_auto_takes_the_scan_for_float_input(monkeypatch):
    calls = []
    import organics.networks.rnn as rnn

    monkeypatch.setattr(rnn, "organics_scan", lambda *args, **kw: calls.append(args) or (torch.zeros(1, 3), None))
    model = ORGaNICsRNN(1, 3, 2)
    model.run(torch.rand(1, 4, 1))
    assert len(calls) == 1


def test_auto_picks_the_persistent_engine_where_it_fits(monkeypatch):
    """On CUDA: persistent up to n = 128 on a GPU with the shared memory its kernels need, else triton."""
    from types import SimpleNamespace

    import organics.networks.scan as scan

    assert scan.default_engine(torch.zeros(1), 128) == "numba"  # a CPU tensor
    monkeypatch.setattr(scan._compiled_steps, "njit", None)  # numba missing
    assert scan.default_engine(torch.zeros(1), 128) == "torch"
    cuda = SimpleNamespace(is_cuda=True, device=torch.device("cuda"))
    monkeypatch.setattr(scan, "_triton_usable", lambda device: True)
    for shared, n, engine in [(232_448, 128, "persistent"), (232_448, 129, "triton"), (65_536, 64, "triton")]:
        properties = SimpleNamespace(shared_memory_per_block_optin=shared)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, p=properties: p)
        assert scan.default_engine(cuda, n) == engine, (shared, n)
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") != "1":
        needed = max(used["shared"] for used in persistent_kernel_resources(128).values())
        assert needed <= scan.PERSISTENT_SHARED_MEMORY  # the constant covers what the kernels need


def test_second_backward_through_the_same_graph_is_refused():
    model = perturbed_rnn(torch.float64)
    y, _ = organics_scan(model.cell, torch.randn(2, 5, 2, dtype=torch.float64))
    loss = y.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_reused_cpu_buffers_change_no_result(engine):
    """A stored pass takes the buffers of the last finished one of its shape; passes alive together do not share.

    Two passes interleaved (both forwards, then both backwards in reverse order) give the readable
    loop's gradients, and passes after them, which write into the buffers those left, give its
    values and gradients too.
    """
    model = perturbed_rnn(torch.float64, preset="paper")
    xs = [torch.randn(3, 9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    expected = [results(model, x, loop(model)) for x in xs]
    model.zero_grad()
    outputs = [organics_scan(model.cell, x, return_trajectory=True, engine=engine) for x in xs]
    losses = [y.square().sum() + (tr.y.sin() * tr.a).sum() + tr.a.cos().sum() for y, tr in outputs]
    spare = []
    for loss in reversed(losses):
        loss.backward()
        (buffers,) = scan_module._SPARE.values()  # one set kept: the last finished pass's
        spare.append({t.data_ptr() for t in buffers if t is not None})
    assert not spare[0] & spare[1]  # alive together, the two passes had buffers of their own
    for name, p in model.named_parameters():
        if name.startswith("cell.") and p.grad is not None:
            torch.testing.assert_close(p.grad, expected[0][name] + expected[1][name], **TOLERANCES[torch.float64])
    for x, want in zip(xs, expected, strict=True):
        assert_same(want, results(model, x, scan(model, engine)), torch.float64)
        (buffers,) = scan_module._SPARE.values()
        assert {t.data_ptr() for t in buffers if t is not None} == spare[1]  # written into the kept set


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_non_positive_modulators_are_refused_in_backward(engine):
    """a > 0 always holds from the cell's initial state; an initial a <= 0 (only reachable here) is detected."""
    model = perturbed_rnn(torch.float64)
    inputs = scan_inputs(model.cell, torch.randn(2, 5, 2, dtype=torch.float64))
    y, _, _ = _Scan.apply(engine, False, False, *inputs._replace(a0=-inputs.a0))
    with pytest.raises(FloatingPointError, match="modulators"):
        y.sum().backward()


def test_bad_engine_raises():
    model = perturbed_rnn(torch.float64)
    with pytest.raises(ValueError, match="engine"):
        organics_scan(model.cell, torch.rand(1, 2, 2, dtype=torch.float64), engine="cudnn")
    with pytest.raises(ValueError, match="x must be"):
        organics_scan(model.cell, torch.rand(1, 2, 2).half())
    with pytest.raises(ValueError, match="engine='numba' needs numba and a CPU tensor"):
        organics_scan(model.cell, torch.rand(1, 2, 2, dtype=torch.float64, device="meta"), engine="numba")
    with pytest.raises(ValueError, match="engine must be one of"):
        ORGaNICsRNN(2, 4, engine="cudnn", impl="loop")  # refused when set, not at the first forward pass
    with pytest.raises(ValueError, match="engine must be one of"):
        model.engine = "cudnn"
    for shape in ((0, 2, 2), (1, 0, 2), (2, 2)):  # no sequence, no step, no batch axis
        with pytest.raises(ValueError, match="x "):
            organics_scan(model.cell, torch.rand(*shape, dtype=torch.float64))
        with pytest.raises(ValueError, match="x "):
            organics_scan_runs([model.cell], [torch.rand(*shape, dtype=torch.float64)])


KERNELS = ("organics.networks._kernels", "organics.networks._persistent")


@pytest.fixture
def interpreted_kernels():
    """The Triton kernels as the interpreter runs them on CPU tensors (a process started with TRITON_INTERPRET=1).

    Triton decides at import whether kernels are interpreted, so these tests run in a fresh
    process (:func:`test_triton_engines_under_the_interpreter`); in the main test process they skip.
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: the Triton (CUDA) engines cannot be exercised")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs in a fresh process with TRITON_INTERPRET=1 (test_triton_engines_under_the_interpreter)")
    modules = [importlib.import_module(name) for name in KERNELS]
    assert type(modules[0].forward_step).__name__ == "InterpretedFunction"
    assert type(modules[1].forward).__name__ == "InterpretedFunction"
    return modules


def test_triton_engines_under_the_interpreter():
    """The interpreter tests below, in a fresh process started with TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton is not installed, or this is already the interpreter process")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        __file__,
        "-k",
        "equal_loop_under_the_interpreter or pads or several_networks or resident_engine",
    ]
    result = subprocess.run(
        command, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900,
        cwd=os.path.dirname(__file__),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "22 passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("engine", ["triton", "persistent"])
@pytest.mark.parametrize("cell", CELLS)
def test_triton_engines_equal_loop_under_the_interpreter(interpreted_kernels, cell, engine):
    dtype = torch.float64
    model = perturbed_rnn(dtype, n=4, **CELLS[cell])
    x = torch.randn(2, 4, 2, dtype=dtype, generator=torch.Generator().manual_seed(1))
    assert_same(results(model, x, loop(model)), results(model, x, scan(model, engine=engine)), dtype)
    with torch.no_grad():  # evaluation: no gradient needed (the triton engine has no storage-free pass of its own)
        y = organics_scan(model.cell, x, engine=engine)[0]
        model.impl = "loop"
        y_ref, _ = model.run(x, return_trajectory=True)
    torch.testing.assert_close(y, y_ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("n", [20, 100])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_persistent_engine_pads_neurons_and_tiles_the_batch(interpreted_kernels, dtype, n):
    """n = 20 or 100 (padded to 32 or 128 in the kernel; at 128 the backward kernel sums the step-size and sigma
    gradients over pairs of rows), batch 19 (two tiles of 16), final y only and the no-grad path."""
    model = perturbed_rnn(dtype, n=n, preset="paper")
    x = torch.randn(19, 6, 2, dtype=dtype, generator=torch.Generator().manual_seed(2))
    assert_same(results(model, x, loop(model)), results(model, x, scan(model, engine="persistent")), dtype)
    with torch.no_grad():
        y, _ = organics_scan(model.cell, x, engine="persistent")
        model.impl = "loop"
        torch.testing.assert_close(y, model.run(x)[0], **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cell", ["paper", "rectified"])
def test_persistent_engine_runs_several_networks_in_one_launch(interpreted_kernels, dtype, cell):
    """Three networks, each on its own batch, through one launch per direction: each as if run alone."""
    models = [perturbed_rnn(dtype, n=5, seed=seed, **CELLS[cell]) for seed in range(3)]
    xs = [torch.randn(17, 5, 2, dtype=dtype, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    expected = []
    for model, x in zip(models, xs, strict=True):
        model.zero_grad()
        model.impl = "loop"
        y, _ = model.run(x)
        (y.square().sum() + y.sin().sum()).backward()
        expected.append({"y": y.detach(), **{k: p.grad.clone() for k, p in model.cell.named_parameters()}})
    for model in models:
        model.zero_grad()
    ys = organics_scan_runs([m.cell for m in models], xs, engine="persistent")
    sum(y.square().sum() + y.sin().sum() for y in ys).backward()
    for model, y, reference in zip(models, ys, expected, strict=True):
        actual = {"y": y.detach(), **{k: p.grad for k, p in model.cell.named_parameters()}}
        assert_same(reference, actual, dtype)
    with torch.no_grad():
        ys = organics_scan_runs([m.cell for m in models], xs, engine="persistent")
    for y, reference in zip(ys, expected, strict=True):
        torch.testing.assert_close(y, reference["y"], **TOLERANCES[dtype])


def relative_errors(expected, actual):
    """``max |actual - expected| / max |expected|`` of every output and gradient."""
    return {k: float((actual[k].double() - v).abs().max() / v.abs().max()) for k, v in expected.items()}


@pytest.mark.parametrize("n", [20, 100])
@pytest.mark.parametrize("cell", ["paper", "rectified"])
def test_resident_engine_is_the_loop_to_half_precision(interpreted_kernels, cell, n):
    """Half-precision products, per-row scaled, float32 accumulation: within 1e-3 of the float64 loop.

    Measured (largest relative error of an output or gradient): 1e-4 at n = 20, 7e-4 at n = 100
    (the paper preset's gradient of ``W_b0x``). n = 20 or 100 (padded to 32 or 128), batch 19
    (two tiles), 12 steps; the same models as runs of one launch; float64 input is refused.
    """
    reference = perturbed_rnn(torch.float64, n=n, **CELLS[cell])
    x = torch.randn(19, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = results(reference, x, loop(reference))
    model = perturbed_rnn(torch.float32, n=n, **CELLS[cell])
    model.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    errors = relative_errors(expected, results(model, x.float(), scan(model, engine="resident")))
    assert max(errors.values()) < 1e-3, errors
    assert max(errors.values()) > 1e-6  # the products are rounded to half precision: not float32's 1e-7
    models = [model, perturbed_rnn(torch.float32, n=n, seed=1, **CELLS[cell])]
    ys = organics_scan_runs([m.cell for m in models], [x.float()] * 2, engine="resident")
    assert float((ys[0].detach().double() - expected["y"]).abs().max() / expected["y"].abs().max()) < 1e-3
    with torch.no_grad():  # the evaluation kernel (no stored steps)
        y, _ = organics_scan(model.cell, x.float(), engine="resident")
    assert float((y.double() - expected["y"]).abs().max() / expected["y"].abs().max()) < 1e-3
    with pytest.raises(ValueError, match="float32"):
        organics_scan(reference.cell, x, engine="resident")


def test_runs_in_one_launch_need_one_shape():
    models = [perturbed_rnn(torch.float64, n=n) for n in (4, 5)]
    xs = [torch.randn(2, 3, 2, dtype=torch.float64)] * 2
    with pytest.raises(ValueError, match="one hidden size"):
        organics_scan_runs([m.cell for m in models], xs, engine="persistent")
    with pytest.raises(ValueError, match="same length"):
        organics_scan_runs([models[0].cell], xs)
    ys = organics_scan_runs([m.cell for m in models], xs, engine="torch")  # the other engines run them in turn
    for model, x, y in zip(models, xs, ys, strict=True):
        torch.testing.assert_close(y, organics_scan(model.cell, x)[0])


@pytest.mark.parametrize("precision", ["tf32", "ieee", "fp16"])
def test_persistent_kernels_fit_an_h100s_shared_memory_at_table_2_size(precision):
    """At n = 128 (Table 2's largest) both kernels compile for sm_90 within a block's shared memory.

    An H100 window found the forward kernel asking for 794,624 bytes (Triton's default pipelining
    gave each weight tile its own buffers); compiling for sm_90 here gives the same number for
    that launch, so this test would have caught it without a GPU.
    """
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(RuntimeError, match="interpreter"):
            persistent_kernel_resources(128)
        return
    from organics.networks import _persistent

    with pytest.raises(ValueError, match="precision"):
        persistent_kernel_resources(128, "bf16")
    resources = persistent_kernel_resources(128, precision)
    assert set(resources) == {"forward, training", "forward, evaluation", "backward"}
    for name, used in resources.items():
        assert 0 < used["shared"] <= _persistent.SHARED_MEMORY_LIMIT, f"{name}: {used['shared']} bytes of shared memory"
        assert 0 < used["registers"] <= 255 and used["stack"] >= 0, (name, used)
        assert used["system_loads"] == 0 and used["wide_loads"] >= 6, (name, used)  # cached 16-byte weight loads
        # the step loop: six products of 16 x 128 x 128 over 8 warps, 96 half-precision mma (k 16) or 192 TF32 (k 8);
        # IEEE float32 products do not use the tensor cores
        assert used["step_tensor_core"] == {"fp16": 96, "tf32": 192, "ieee": 0}[precision], (name, used)
        assert used["step_instructions"] > used["step_barriers"] > 0, (name, used)
        assert used["step_local_memory"] == 0 or used["stack"] > 0, (name, used)  # spill accesses need a stack
        # the elementwise work keeps the loads' layout (_persistent: Register layouts): one barrier for the products'
        # left operands and about two per change of the products' layout; compiled by Triton 3.6, 10 (fp16) and 20
        # (TF32); with the elementwise work in the MMA layout, up to 70, and with half tiles (TF32 forward until
        # 2026-11-28) 40
        assert used["step_barriers"] <= {"fp16": 12, "tf32": 24, "ieee": 24}[precision], (name, used)


def test_step_loop_counts_read_the_longest_loop_of_the_machine_code():
    """The counts cover the span from the farthest backward branch's target to that branch, predicated or not."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0030*/                   LDL R2, [R1] ;
        /*0040*/               @P1 BRA 0x20 ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   STL [R1], R2 ;
        /*0070*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0080*/              @!P0 BRA 0x50 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
    """
    counts = _step_loop_counts(sass)  # the loop 0x50-0x80, longer than 0x20-0x40; the last BRA jumps to itself
    assert counts == {"step_instructions": 4, "step_barriers": 1, "step_tensor_core": 1, "step_local_memory": 1}
