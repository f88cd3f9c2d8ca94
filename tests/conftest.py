"""Shared fixtures; shared tables and helpers are in ``testlib.py``."""
import copy
from pathlib import Path

import pytest
import torch

from rest_mm.cli.check_device import RUNS_SLACK, ULPS
from rest_mm.cli.toy_data import generate_toy_datasets

from testlib import REFERENCE_ARCH, REFERENCE_DIR, SPEC


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture(scope='session')
def reference_arch() -> dict:
    return dict(REFERENCE_ARCH)


# The rounding rule of the device check, one home (rest_mm/cli/check_device.py says why)
FLOAT32_RUNS_SLACK = RUNS_SLACK
FLOAT32_ULPS = ULPS


@pytest.fixture(scope='session')
def float32_tolerance():
    """``float32_tolerance(model, x)``: per output of ``model(x)``, the largest difference
    from another float32 implementation of the same function that is rounding alone:
    ``FLOAT32_RUNS_SLACK * e32 + FLOAT32_ULPS * eps32 * max|output|``, where ``e32`` is how
    far this machine's float32 output is from its float64 one, measured on ``x``. A
    tolerance derived from the arithmetic of the input at hand, not printed by one machine.
    """
    def tolerance(model: torch.nn.Module, x: torch.Tensor) -> list:
        exact_model = copy.deepcopy(model).double()
        with torch.no_grad():
            single, double = model(x), exact_model(x.double())
        eps = torch.finfo(torch.float32).eps
        return [FLOAT32_RUNS_SLACK * (s.double() - d).abs().max().item()
                + FLOAT32_ULPS * eps * d.abs().max().item() for s, d in zip(single, double)]
    return tolerance


@pytest.fixture(scope='module')
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('toy_data')
    generate_toy_datasets(str(root), SPEC)
    return root


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A folder in which no file can be created, for root too: chmod 555 where that binds;
    as root (which ignores permissions) /sys, where the kernel refuses new files."""
    folder = tmp_path / 'read_only'
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / 'probe').touch()
    except OSError:
        yield folder
        folder.chmod(0o755)
        return
    (folder / 'probe').unlink()
    folder.chmod(0o755)
    sys_dir = Path('/sys')
    try:
        (sys_dir / 'rest_mm_probe').touch()
    except OSError:
        yield sys_dir
        return
    (sys_dir / 'rest_mm_probe').unlink()
    pytest.skip('no folder here refuses new files (root, and /sys is writable)')
