"""bnexp's optimizers (bnexp.optim) are torch's, minus the import of torch._dynamo:
the same numbers bit for bit, and a run that never loads the compiler."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bnexp import optim
from tests.conftest import TINY, _cli_env

SETTINGS = {
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "adam": dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-3),
    "adamw": dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2),
}
TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Sigmoid(), torch.nn.Linear(5, 3))


def _train(opt_cls, name: str, steps: int, state: dict | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    net = _net()
    opt = opt_cls(net.parameters(), **SETTINGS[name])
    if state is not None:
        opt.load_state_dict(state)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else (_same_state(a[k], b[k]) if isinstance(a[k], dict) else a[k] == b[k])
               for k in a)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_bnexp_optimizers_train_bit_identical_to_torchs_and_keep_its_state_dict(name):
    ours_net, ours = _train(optim.optimizer_class(name), name, 5)
    torch_net, theirs = _train(TORCH[name], name, 5)
    assert isinstance(ours, TORCH[name]) and type(ours) is not TORCH[name]
    for p, q in zip(ours_net.parameters(), torch_net.parameters()):
        assert torch.equal(p, q)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(_same_state(a["state"][k], b["state"][k]) for k in b["state"]) and a["state"].keys() == b["state"].keys()
    # Either loads the other's state_dict (a checkpoint written by one resumes in the other).
    resumed = _train(optim.optimizer_class(name), name, 0, state=b)[1]
    assert _same_state(resumed.state_dict()["state"][0], b["state"][0])


def test_compiled_runs_get_torchs_own_optimizer_classes():
    assert optim.optimizer_class("sgd", compile=True) is torch.optim.SGD
    assert optim.optimizer_class("adamw", compile=True) is torch.optim.AdamW


def test_step_hooks_run_once_per_step():
    net = _net()
    opt = optim.optimizer_class("sgd")(net.parameters(), lr=0.1)
    torch.optim.SGD(_net().parameters(), lr=0.1)  # torch's own class gets its step wrapped too
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    net(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert calls == [1]


@pytest.mark.slow  # a fresh interpreter per optimizer
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_training_run_never_imports_torch_dynamo(tmp_path, optimizer):
    # A whole `bnexp train` (optimizer built, stepped, checkpointed, evaluated) in a fresh interpreter.
    code = (
        "import sys\nfrom bnexp.cli import main\n"
        f"sys.argv = ['bnexp', 'train', *{TINY!r}, 'optim={optimizer}', 'hydra.run.dir={tmp_path / 'run'}']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('DYNAMO' if 'torch._dynamo' in sys.modules else 'NO DYNAMO')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=_cli_env(None), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "NO DYNAMO"
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
