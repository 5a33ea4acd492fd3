"""The GPU tier of the
Triton kernels (marker ``gpu``, skipped without CUDA): dtype x size x tensor count x planted value
against the reference, no host sync during a full scaler step with a fused optimizer, CUDA-graph
capture of a training step. The CPU tier of the kernel runs in Triton's interpreter:
``tests/interpreted`` (started by tests/test_kernels.py)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from distscale import GradScaler, kernels
from tests.kernel_cases import DTYPES, INF, MODES, NAN, PLANTS, check_case, layout, plant

# ---------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


requires_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="needs a CUDA GPU (and TRITON_INTERPRET unset: the interpreter runs kernels on the host)",
)


GPU_SIZES = {
    "empty": [0],
    "one": [1],
    "odd": [7, 3, 1],
    "pow2pm1": [8191, 8193, 2**20 - 1, 2**20 + 1],
    "grid": [3 * 2**22 + 7],  # many more blocks than the GPU has SMs
    "many": [(i * 7919) % 5000 + 1 for i in range(300)],
}


def _gpu_tensors(sizes: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [(torch.randn(n, device="cuda", generator=gen) * 8).to(dtype) for n in sizes]


@gpu
@requires_gpu
@pytest.mark.parametrize(
    "plant_at", [None, *PLANTS], ids=lambda p: "clean" if p is None else f"{p[1]}@{p[0]}"
)
@pytest.mark.parametrize("sizes", list(GPU_SIZES))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_gpu_kernel_matches_reference(
    dtype: torch.dtype, sizes: str, plant_at: tuple[str, float] | None
) -> None:
    pytest.importorskip("triton")
    from distscale.kernels import triton_ops

    for unscale, norm in MODES:
        tensors = _gpu_tensors(GPU_SIZES[sizes], dtype)
        if plant_at is not None:
            plant(tensors, *plant_at)
        problem = check_case(tensors, None, None, unscale, norm, triton_ops.fused_check_)
        assert problem is None, f"unscale={unscale} norm={norm}: {problem}"


@gpu
@requires_gpu
@pytest.mark.parametrize("lay", ["strided", "flat", "prefix", "sizes"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_gpu_layouts(dtype: torch.dtype, lay: str) -> None:
    pytest.importorskip("triton")
    from distscale.kernels import triton_ops

    for unscale, norm in MODES:
        tensors, counts, block = layout(lay, dtype)
        tensors = [t.cuda() for t in tensors] if lay != "flat" else _flat_on_gpu(dtype)
        plant(tensors, "last", NAN)
        problem = check_case(tensors, counts, block, unscale, norm, triton_ops.fused_check_)
        assert problem is None, f"unscale={unscale} norm={norm}: {problem}"


def _flat_on_gpu(dtype: torch.dtype) -> list[torch.Tensor]:
    # .cuda() on views copies each one: rebuild the views over one device buffer instead.
    flat = (torch.randn(4100, device="cuda") * 8).to(dtype)
    return [flat[1:1001].view(10, 100), flat[1001:1002], flat[1002:3001], flat[3001:4100]]


@gpu
@requires_gpu
def test_gpu_auto_picks_triton() -> None:
    pytest.importorskip("triton")
    for dtype in DTYPES.values():
        assert kernels.backend("auto", torch.device("cuda"), dtype) == "triton"


class _Mixed(nn.Module):
    """fp32 and fp16 parameters: two (device, dtype) groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 256)
        self.b = nn.Linear(256, 8).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).half()).float()


@gpu
@requires_gpu
def test_gpu_full_step_has_no_host_sync() -> None:
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = _Mixed().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = GradScaler("cuda", kernel="triton")
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")

    def step() -> None:
        loss = (model(x) - y).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.clip_grad_norm_(optimizer, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=False)

    step()  # warm-up: state moved to the device, kernels compiled, tables built
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu
@requires_gpu
def test_gpu_cuda_graph_step_matches_eager() -> None:
    pytest.importorskip("triton")
    steps, warmup, bad_step = 10, 3, 6
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [
        (torch.randn(16, 32, device="cuda", generator=gen), torch.randn(16, 4, device="cuda", generator=gen))
    ]
    batches += [
        (torch.randn(16, 32, device="cuda", generator=gen), torch.randn(16, 4, device="cuda", generator=gen))
        for _ in range(steps - 1)
    ]
    batches[bad_step][0][0, 0] = INF  # overflows the backward: a skipped step inside the graph

    def make() -> tuple[nn.Module, torch.optim.Optimizer, GradScaler]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
        return model, opt, GradScaler("cuda", init_scale=2.0**10, growth_interval=2, kernel="triton")

    def step(model: nn.Module, opt: torch.optim.Optimizer, scaler: GradScaler, x, y) -> None:
        opt.zero_grad(set_to_none=False)  # backward must reuse the grads the tables point at
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
        scaler.scale((out.float() - y).pow(2).mean()).backward()
        scaler.clip_grad_norm_(opt, 1.0)
        scaler.step(opt)
        scaler.update()

    eager = make()
    scales_eager = []
    for x, y in batches:
        step(*eager, x, y)
        scales_eager.append(eager[2]._state.scale.clone())

    graphed = make()
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    scales_graph = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:warmup]:
            static_x.copy_(x)
            static_y.copy_(y)
            step(*graphed, static_x, static_y)
            scales_graph.append(graphed[2]._state.scale.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*graphed, static_x, static_y)
    for x, y in batches[warmup:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        scales_graph.append(graphed[2]._state.scale.clone())
    torch.cuda.synchronize()
    assert torch.equal(torch.stack(scales_graph), torch.stack(scales_eager))
    assert scales_eager[bad_step] < scales_eager[bad_step - 1]  # the planted step was skipped
    for a, b in zip(graphed[0].parameters(), eager[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
