"""torch.amp.GradScaler's internals that code in the wild reaches into (accelerate, optimizers of
the legacy ``grad_scaler=`` protocol, tests): each behaves as torch's, checked side by side with
torch's own scaler on the same model, and the legacy protocol keeps every rank's decision."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import distscale
from distscale.testing import run_ranks
from tests import dist_cases as dc
from tests import tiny

INF = float("inf")


def both(**kwargs) -> tuple[distscale.GradScaler, torch.amp.GradScaler]:
    return distscale.GradScaler("cpu", **kwargs), torch.amp.GradScaler("cpu", **kwargs)


def twin_models() -> tuple[nn.Module, nn.Module]:
    return tiny.model(), tiny.model()


# ---------------------------------------------------------------------------- _scale, _growth_tracker


def test_scale_and_growth_tracker_are_none_before_the_first_scale_then_live_tensors() -> None:
    ours, theirs = both(init_scale=2.0**8, growth_interval=2)
    assert ours._scale is None and ours._growth_tracker is None
    assert theirs._scale is None and theirs._growth_tracker is None
    nets, opts = twin_models(), []
    for net in nets:
        opts.append(torch.optim.SGD(net.parameters(), lr=0.1))
    held = []
    for step in range(5):
        for scaler, net, opt in zip((ours, theirs), nets, opts, strict=True):
            opt.zero_grad()
            tiny.backward(net, scaler, step)
            if step == 3:
                tiny.plant(net, INF)
            scaler.step(opt)
            scaler.update()
        if step == 0:
            held = [ours._scale, ours._growth_tracker]
        for name in ("_scale", "_growth_tracker"):
            a, b = getattr(ours, name), getattr(theirs, name)
            assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape), name
            assert torch.equal(a, b), (step, name, a, b)
    # Live: the tensors read at step 0 follow every later update (references stay valid).
    assert held[0] is ours._scale and held[1] is ours._growth_tracker
    disabled = distscale.GradScaler("cpu", enabled=False)
    disabled.scale(torch.ones(()))
    assert disabled._scale is None and disabled._get_scale_async() is None


def test_assigning_scale_or_growth_tracker_writes_the_state() -> None:
    scaler = distscale.GradScaler("cpu", init_scale=2.0**8)
    scaler._scale = torch.tensor(32.0)  # before the first scale(): places the state as well
    scaler._growth_tracker = torch.tensor([7], dtype=torch.int32)
    assert scaler.get_scale() == 32.0 and scaler._get_growth_tracker() == 7
    assert scaler.state_dict()["state"]["scale"] == 32.0
    with pytest.raises(TypeError, match=r"_scale must be a 1-element tensor, got float 2\.0"):
        scaler._scale = 2.0  # type: ignore[assignment]
    assert scaler.get_scale() == 32.0


def test_settings_read_as_torchs_private_attributes() -> None:
    ours, theirs = both(init_scale=3.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=9)
    for name in (
        "_init_scale",
        "_growth_factor",
        "_backoff_factor",
        "_growth_interval",
        "_init_growth_tracker",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours._device == theirs._device == "cpu" and ours._enabled is theirs._enabled is True


def test_init_growth_tracker_seeds_the_first_tracker_and_follows_a_load() -> None:
    ours, theirs = both(init_scale=2.0**8, growth_interval=3)
    for scaler in (ours, theirs):
        scaler._init_growth_tracker = 2  # before the first scale(): the tracker starts there
        scaler.scale(torch.ones(()))
    assert ours._growth_tracker.item() == theirs._growth_tracker.item() == 2
    for scaler in (ours, theirs):
        scaler._init_growth_tracker = 1  # a tracker in use is left alone
    assert ours._init_growth_tracker == theirs._init_growth_tracker == 1
    assert ours._growth_tracker.item() == theirs._growth_tracker.item() == 2
    saved = torch.amp.GradScaler("cpu")
    saved._lazy_init_scale_growth_tracker(torch.device("cpu"))
    saved._growth_tracker.fill_(0)
    for scaler in (ours, theirs):
        scaler.load_state_dict(saved.state_dict())
    assert ours._init_growth_tracker == theirs._init_growth_tracker == 0
    with pytest.raises(TypeError, match=r"_init_growth_tracker must be an int, got float 1\.5"):
        ours._init_growth_tracker = 1.5  # type: ignore[assignment]


# ---------------------------------------------------------------------------- lazy init (accelerate's FSDP2 load_state)


def test_lazy_init_places_the_state_keeps_a_loaded_one_and_refuses_a_second_call() -> None:
    ours, theirs = both(init_scale=2.0**8)
    ours._lazy_init_scale_growth_tracker("cpu")  # accelerate passes scaler._device, a str
    theirs._lazy_init_scale_growth_tracker(torch.device("cpu"))
    assert torch.equal(ours._scale, theirs._scale) and torch.equal(
        ours._growth_tracker, theirs._growth_tracker
    )
    for scaler in (ours, theirs):
        with pytest.raises(AssertionError, match="_growth_tracker initialized before _scale"):
            scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    # load_state_dict, then lazy init: the loaded scale and tracker are the ones placed.
    ours, theirs = both(init_scale=2.0**8)
    saved = torch.amp.GradScaler("cpu", init_scale=2.0**5)
    saved._lazy_init_scale_growth_tracker(torch.device("cpu"))
    saved._growth_tracker.fill_(3)
    for scaler in (ours, theirs):
        scaler.load_state_dict(saved.state_dict())
        scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    assert ours._scale.item() == theirs._scale.item() == 2.0**5
    assert ours._growth_tracker.item() == theirs._growth_tracker.item() == 3


# ---------------------------------------------------------------------------- _per_optimizer_states


def _view(scaler, opt) -> tuple:
    state = scaler._per_optimizer_states[id(opt)]
    return state["stage"], {d: float(f) for d, f in state["found_inf_per_device"].items()}


def test_per_optimizer_states_follow_the_stages_as_torchs() -> None:
    ours, theirs = both(init_scale=2.0**8)
    nets = twin_models()
    opts = [torch.optim.SGD(net.parameters(), lr=0.1) for net in nets]
    seen: list[tuple[tuple, tuple]] = []
    for scaler, net, opt in zip((ours, theirs), nets, opts, strict=True):
        views = [_view(scaler, opt)]
        tiny.backward(net, scaler, 0)
        tiny.plant(net, INF)
        scaler.unscale_(opt)
        views.append(_view(scaler, opt))
        scaler.step(opt)
        views.append(_view(scaler, opt))
        scaler.update()
        views.append(_view(scaler, opt))
        seen.append(tuple(views))
    assert seen[0] == seen[1]
    assert [stage.name for stage, _ in seen[0]] == ["READY", "UNSCALED", "STEPPED", "READY"]
    assert seen[0][1][1] == {torch.device("cpu"): 1.0} and seen[0][3][1] == {}
    assert ours._per_optimizer_states[id(opts[0])]["stage"] is torch.amp.grad_scaler.OptState.READY


# ---------------------------------------------------------------------------- _unscale_grads_


@pytest.mark.parametrize("plant", [None, INF, float("nan")])
def test_unscale_grads_matches_torchs_bit_for_bit_and_leaves_found_inf_alone(plant) -> None:
    ours, theirs = both(init_scale=2.0**8)
    nets = twin_models()
    opts = [torch.optim.SGD(net.parameters(), lr=0.1) for net in nets]
    results = []
    for scaler, net, opt in zip((ours, theirs), nets, opts, strict=True):
        tiny.backward(net, scaler, 1)
        if plant is not None:
            tiny.plant(net, plant)
        inv = torch.full((), 1 / 3, dtype=torch.float32)
        found = torch.zeros(())
        per_device = scaler._unscale_grads_(opt, inv, found, False)
        assert found.item() == 0.0  # torch fills per-device copies, not the tensor it was given
        results.append(
            ({d: f.item() for d, f in per_device.items()}, [p.grad.clone() for p in net.parameters()])
        )
    assert results[0][0] == results[1][0] == {torch.device("cpu"): 0.0 if plant is None else 1.0}
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_unscale_grads_refuses_fp16_unless_allowed_and_skips_params_without_grads() -> None:
    net = nn.Linear(4, 4).half()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = distscale.GradScaler("cpu")
    assert scaler._unscale_grads_(opt, torch.ones(()), torch.zeros(()), False) == {}  # no grads yet
    net(torch.ones(2, 4, dtype=torch.float16)).sum().backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler._unscale_grads_(opt, torch.ones(()), torch.zeros(()), False)
    assert (
        scaler._unscale_grads_(opt, torch.ones(()), torch.zeros(()), True)[torch.device("cpu")].item() == 0.0
    )


# ---------------------------------------------------------------------------- the legacy protocol


def test_legacy_grad_scaler_protocol_matches_torch_on_one_process() -> None:
    ours, theirs = both(init_scale=2.0**8, growth_interval=2)
    nets = twin_models()
    opts = [dc.LegacyProtocolSGD(net.parameters(), lr=0.1, momentum=0.9) for net in nets]
    for step in range(6):
        returned = []
        for scaler, net, opt in zip((ours, theirs), nets, opts, strict=True):
            opt.zero_grad()
            tiny.backward(net, scaler, step)
            if step == 2:
                tiny.plant(net, INF)
            with pytest.warns(FutureWarning):  # both: torch deprecates the protocol
                returned.append(scaler.step(opt))
            scaler.update()
        assert returned[0] == returned[1] == ("skipped" if step == 2 else "stepped"), step
        assert ours.get_scale() == theirs.get_scale(), step
        for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            assert torch.equal(a, b), step


def test_a_legacy_optimizer_that_never_asks_leaves_update_without_a_decision() -> None:
    class Silent(torch.optim.SGD):
        _step_supports_amp_scaling = True

        def step(self, closure=None, grad_scaler=None):  # type: ignore[override]
            return super().step(closure)

    net = tiny.model()
    opt = Silent(net.parameters(), lr=0.1)
    scaler = distscale.GradScaler("cpu")
    tiny.backward(net, scaler, 0)
    with pytest.warns(FutureWarning):
        scaler.step(opt)
    with pytest.raises(AssertionError, match="No inf checks were recorded prior to update"):
        scaler.update()


def test_pickling_keeps_the_internals_behaving() -> None:
    scaler = distscale.GradScaler("cpu", init_scale=2.0**7)
    net = tiny.model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    tiny.run(scaler, net, opt, {}, 2)
    copy = pickle.loads(pickle.dumps(scaler))
    assert copy._scale is None  # as torch's: unpickled state is placed again by the next scale()
    assert copy.get_scale() == scaler.get_scale() and copy._init_scale == 2.0**7
    tiny.backward(net, copy, 2)
    assert copy._scale.item() == scaler.get_scale()


@pytest.mark.slow
def test_legacy_protocol_on_two_ranks_every_rank_skips_together() -> None:
    setups = ["ddp", "fsdp2"]
    results = run_ranks(dc.job_legacy_protocol, 2, setups)
    for setup in setups:
        r0, r1 = results[0][setup], results[1][setup]
        expected = ["stepped", "stepped", "skipped", "stepped", "stepped"]
        assert r0["returned"] == r1["returned"] == expected, setup  # the inf sat on rank 1 only
        assert r0["scales"] == r1["scales"] and r0["scales"][2] == r0["scales"][1] / 2, setup
        assert r0["collectives"] == r1["collectives"] == [1] * 5, setup
        if setup == "ddp":
            assert r0["params"] == r1["params"]
