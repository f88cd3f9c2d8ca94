"""Shared fixtures. Helpers live here (not in an importable ``tests`` package: the
mmsegmentation wheel installs a top-level ``tests`` package of its own)."""
import importlib.util
from pathlib import Path

import pytest
import torch

TOOLS_DIR = Path(__file__).resolve().parents[1] / 'tools'
REFERENCE_DIR = Path(__file__).parent / 'data' / 'reference'
# The reference models' shape (see tests/data/reference/README.md).
REFERENCE_ARCH = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                      sr_ratios=(8, 4, 2, 1), mlp_ratio=4.)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture(scope='session')
def reference_arch() -> dict:
    return dict(REFERENCE_ARCH)


@pytest.fixture(scope='session')
def load_tool():
    """``load_tool(name)`` imports the script ``tools/<name>.py`` by path (``tools`` is not
    a package)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f'tool_{name}', TOOLS_DIR / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
