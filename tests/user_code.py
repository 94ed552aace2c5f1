"""Helpers for the format and bad-input tests: a throw-away *user* package (train-time net, its
hand-written deploy-mode twin, a module that leaves a mark when imported), written to a temporary
directory and made importable only for the duration of one test."""

from __future__ import annotations

import builtins
import itertools
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from repfuse.samples import randomize_bn

NETS = textwrap.dedent('''
    import torch
    from torch import nn


    def conv_bn(cin, cout, k, stride, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout))


    class TrainBlock(nn.Module):
        def __init__(self, cin, cout, stride=1, groups=1):
            super().__init__()
            self.dense = conv_bn(cin, cout, 3, stride, groups)
            self.one = conv_bn(cin, cout, 1, stride, groups)
            self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
            self.act = nn.ReLU()

        def forward(self, x):
            out = self.dense(x) + self.one(x)
            if self.skip is not None:
                out = out + self.skip(x)
            return self.act(out)


    class TrainNet(nn.Module):
        def __init__(self, width=8, num_classes=5, groups=2):
            super().__init__()
            self.stem = TrainBlock(3, width, 2)
            self.body = TrainBlock(width, width, 1, groups)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            x = self.body(self.stem(x))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


    class DeployBlock(nn.Module):
        def __init__(self, cin, cout, stride=1, groups=1):
            super().__init__()
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
            self.nonlinearity = nn.ReLU()

        def forward(self, x):
            return self.nonlinearity(self.rbr_reparam(x))


    class DeployNet(nn.Module):
        def __init__(self, width=8, num_classes=5, groups=2):
            super().__init__()
            self.stage0 = DeployBlock(3, width, 2)
            self.stage1 = DeployBlock(width, width, 1, groups)
            self.classifier = nn.Linear(width, num_classes)

        def forward(self, x):
            x = self.stage1(self.stage0(x))
            return self.classifier(x.mean((2, 3)))


    def build(width=8, num_classes=5, groups=2):
        return TrainNet(width, num_classes, groups)


    def build_deploy(width=8, num_classes=5, groups=2):
        return DeployNet(width, num_classes, groups)


    def not_a_model():
        return {"weights": 1}


    def broken():
        raise ValueError("factory exploded")


    SIZE = 3
''')

MARKER = "IMPORTED"
TOUCH = textwrap.dedent(f'''
    import os
    open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), {MARKER!r}), "w").close()
    from .nets import build
''')

_counter = itertools.count()


def write_user_package(root: Path, name: str) -> None:
    """`name/nets.py` (TrainNet / DeployNet and factories) and `name/touch.py` (writes root/IMPORTED
    when imported, then re-exports `build`)."""
    pkg = root / name
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS)
    (pkg / "touch.py").write_text(TOUCH)


class UserEnv:
    """A user package in `root`, importable while the test runs (cwd = root, as with the CLI)."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    def nets(self):
        __import__(f"{self.name}.nets")
        return sys.modules[f"{self.name}.nets"]

    def train_model(self, seed: int = 0, **kw) -> nn.Module:
        torch.manual_seed(seed)
        return randomize_bn(self.nets().build(**kw), seed).eval()

    def spec(self, attr: str = "build") -> str:
        return f"{self.name}.nets:{attr}"


@pytest.fixture
def user_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh user package (unique name) in tmp_path; cwd is tmp_path; sys.path and sys.modules
    are restored afterwards."""
    name = f"userpkg_fmt{os.getpid()}_{next(_counter)}"
    write_user_package(tmp_path, name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    yield UserEnv(tmp_path, name)
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


class SystemPayload:
    """Unpickling this runs `touch marker` (os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload:
    """Unpickling this writes `marker` through builtins.exec."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))
