"""digitlab's optimizers and schedules do what torch.optim's do, step by step."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from digitlab import optim


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def run_steps(model: torch.nn.Module, optimizer, steps: int, schedule=None) -> list[float]:
    """Train on a fixed random problem; returns the learning rate used at each step."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 7, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    lrs = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if schedule is not None:
            schedule.step()
    return lrs


CASES = [
    (
        "sgd",
        lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    ),
    (
        "adam-foreach",
        lambda ps: optim.Adam(ps, lr=1e-2, weight_decay=1e-2, fused=False),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, foreach=False),
    ),
    (
        "adam-fused",
        lambda ps: optim.Adam(ps, lr=1e-2, weight_decay=1e-2, fused=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, foreach=False),
    ),
    (
        "adamw-foreach",
        lambda ps: optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=False),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    ),
    (
        "adamw-fused",
        lambda ps: optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    ),
]


@pytest.fixture(params=["private-kernels", "public-fallback"])
def kernels(request, monkeypatch):
    """Run a test with the probed private kernels, and again as on a torch that lacks them."""
    if request.param == "public-fallback":
        monkeypatch.setattr(optim, "has_foreach", lambda: False)
        monkeypatch.setattr(optim, "has_fused_adam", lambda device_type: False)
    return request.param


@pytest.mark.parametrize("name, ours, theirs", CASES, ids=[c[0] for c in CASES])
def test_updates_match_torch_optim(name, ours, theirs, kernels):
    a, b = small_model(), small_model()
    run_steps(a, ours(a.parameters()), 20)
    run_steps(b, theirs(b.parameters()), 20)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a[0].weight, small_model()[0].weight)  # it did train


def test_onecycle_matches_torch_onecycle_lr_and_momentum():
    total = 37
    ours_opt = optim.AdamW(small_model().parameters(), lr=5e-3)
    ours = optim.OneCycle(ours_opt, max_lr=5e-3, total_steps=total)
    theirs_opt = torch.optim.AdamW(small_model().parameters(), lr=5e-3)
    theirs = torch.optim.lr_scheduler.OneCycleLR(theirs_opt, max_lr=5e-3, total_steps=total, pct_start=0.25)
    for _ in range(total):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(theirs_opt.param_groups[0]["lr"], rel=1e-9)
        assert ours_opt.param_groups[0]["betas"][0] == pytest.approx(theirs_opt.param_groups[0]["betas"][0])
        theirs_opt.step()
        theirs.step()
        ours.step()
    assert ours_opt.param_groups[0]["lr"] == pytest.approx(5e-3 / 25 / 1e4)


def test_cosine_matches_torch_cosine_annealing():
    total = 23
    ours_opt = optim.SGD(small_model().parameters(), lr=0.2)
    ours = optim.Cosine(ours_opt, lr=0.2, total_steps=total)
    theirs_opt = torch.optim.SGD(small_model().parameters(), lr=0.2)
    theirs = torch.optim.lr_scheduler.CosineAnnealingLR(theirs_opt, T_max=total)
    for _ in range(total + 1):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(theirs_opt.param_groups[0]["lr"], abs=1e-12)
        theirs_opt.step()
        theirs.step()
        ours.step()


@pytest.mark.parametrize("total", [1, 2, 3, 4])
def test_onecycle_survives_runs_too_short_for_a_warmup(total):
    opt = optim.AdamW(small_model().parameters(), lr=1e-2)
    schedule = optim.OneCycle(opt, max_lr=1e-2, total_steps=total)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(total):
        schedule.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert all(0 < lr <= 1e-2 for lr in lrs)


def test_the_kernel_probes_find_this_torchs_fast_paths():
    """torch 2.14 has both; a False here would mean the probe itself is broken (training would be slower)."""
    assert optim.has_foreach()
    assert optim.has_fused_adam("cpu")


def test_a_failing_kernel_probe_means_public_calls(monkeypatch):
    monkeypatch.setattr(optim, "has_foreach", lambda: False)

    def broken(*args, **kwargs):
        raise AssertionError("a private kernel was called after its probe failed")

    monkeypatch.setattr(torch, "_foreach_add_", broken)
    tensors = [torch.ones(3), torch.zeros(2)]
    optim.each("add_", tensors, [torch.ones(3), torch.ones(2)], alpha=2.0)
    assert tensors[0].tolist() == [3.0] * 3 and tensors[1].tolist() == [2.0] * 2


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_weight_decay_spares_biases_and_norm_parameters(name):
    """1-D parameters (biases, batch-norm scale and shift) are not decayed, as in torch.optim with two groups."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    reference = copy.deepcopy(model)
    ours = optim.make_optimizer(name, model.parameters(), lr=1e-2, weight_decay=0.5)
    assert [g["weight_decay"] for g in ours.param_groups] == [0.5, 0.0]
    weights = [p for p in reference.parameters() if p.ndim >= 2]
    others = [p for p in reference.parameters() if p.ndim < 2]
    groups = [{"params": weights, "weight_decay": 0.5}, {"params": others, "weight_decay": 0.0}]
    theirs = {
        "sgd": lambda: torch.optim.SGD(groups, lr=1e-2, momentum=0.9, nesterov=True),
        "adam": lambda: torch.optim.Adam(groups, lr=1e-2),
        "adamw": lambda: torch.optim.AdamW(groups, lr=1e-2),
    }[name]()
    run_steps(model, ours, 10)
    run_steps(reference, theirs, 10)
    for pa, pb in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_step_takes_a_closure_and_returns_its_loss():
    model = small_model()
    opt = optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 7), torch.randint(0, 3, (4,))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = model[0].weight.detach().clone()
    loss = opt.step(closure)
    assert loss is not None and loss.item() > 0
    assert not torch.equal(before, model[0].weight)


def test_a_parameter_in_two_groups_is_refused():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="more than one"):
        optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)


def test_state_of_another_layout_is_refused():
    a = optim.make_optimizer("adamw", small_model().parameters(), lr=1e-2, weight_decay=0.1)
    b = optim.make_optimizer("adamw", torch.nn.Linear(3, 2).parameters(), lr=1e-2, weight_decay=0.1)
    with pytest.raises(ValueError):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_state_dict_round_trip_continues_bit_identically(name):
    straight = small_model()
    opt = optim.make_optimizer(name, straight.parameters(), lr=1e-2, weight_decay=1e-3)
    schedule = optim.make_schedule("onecycle", opt, 1e-2, 12)
    run_steps(straight, opt, 12, schedule)

    first = small_model()
    opt1 = optim.make_optimizer(name, first.parameters(), lr=1e-2, weight_decay=1e-3)
    schedule1 = optim.make_schedule("onecycle", opt1, 1e-2, 12)
    run_steps(first, opt1, 5, schedule1)
    saved = copy.deepcopy((first.state_dict(), opt1.state_dict(), schedule1.state_dict()))

    resumed = small_model(seed=99)
    resumed.load_state_dict(saved[0])
    opt2 = optim.make_optimizer(name, resumed.parameters(), lr=1e-2, weight_decay=1e-3)
    schedule2 = optim.make_schedule("onecycle", opt2, 1e-2, 12)
    opt2.load_state_dict(saved[1])
    schedule2.load_state_dict(saved[2])
    run_steps(resumed, opt2, 7, schedule2)
    for pa, pb in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)


def test_grad_scaler_drives_our_optimizer():
    """fp16 training on CUDA steps through torch.amp.GradScaler, which needs only param_groups and step()."""
    model = small_model()
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(8, 7), torch.randint(0, 3, (8,))
    before = model[0].weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(before, model[0].weight)
    reference = small_model()
    ref_opt = optim.AdamW(reference.parameters(), lr=1e-2)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    ref_opt.step()
    torch.testing.assert_close(model[0].weight, reference[0].weight)  # unscaled before the update


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="rmsprop"):
        optim.make_optimizer("rmsprop", small_model().parameters(), 1e-3, 0.0)
    with pytest.raises(ValueError, match="step"):
        optim.make_schedule("step", optim.SGD(small_model().parameters(), lr=1.0), 1.0, 10)


def test_building_an_optimizer_does_not_import_the_compiler():
    """The reason this module exists: torch.optim imports torch._dynamo (about 1 s) on first use."""
    code = (
        "import sys, torch; from digitlab import optim; m = torch.nn.Linear(3, 2); "
        "o = optim.AdamW(m.parameters(), lr=1e-3); m(torch.ones(1, 3)).sum().backward(); o.step(); "
        "print('torch._dynamo' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
