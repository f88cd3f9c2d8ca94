"""rest_mm.torch_compat: each helper does on the installed torch what it says, whichever
torch of the supported range that is (the suite runs on 2.1 and 2.14 as well as the pinned
stack's)."""
import io
import pickle
from collections import OrderedDict

import pytest
import torch

from rest_mm import torch_compat
from rest_mm.weights.files import restricted_pickle


def test_version_is_parsed_and_required_versions_are_named(monkeypatch):
    major, minor = torch_compat.torch_version()
    assert torch.__version__.startswith(f'{major}.{minor}.')
    torch_compat.require_torch((major, minor), 'this feature')  # no error: the same torch
    with pytest.raises(torch_compat.TorchVersionError,
                       match=rf'flying needs torch >= {major}\.{minor + 1}; this is torch '):
        torch_compat.require_torch((major, minor + 1), 'flying')
    monkeypatch.setattr(torch, '__version__', '2.1.2+cu121')
    assert torch_compat.torch_version() == (2, 1)


def test_tested_range_covers_the_installed_torch():
    low, high = (tuple(int(p) for p in v.split('.')) for v in torch_compat.TESTED_TORCH_RANGE)
    assert low <= torch_compat.torch_version() <= high


def test_is_tracing_sees_jit_tracing_only_while_it_traces():
    seen = []

    def forward(x):
        seen.append(torch_compat.is_tracing())
        return x * 2

    assert not torch_compat.is_tracing()
    torch.jit.trace(forward, torch.ones(2), check_trace=False)  # one call, while tracing
    assert seen == [True]
    forward(torch.ones(2))
    assert seen == [True, False]


def test_is_compiling_sees_torch_compile_only_while_it_compiles():
    def forward(x):
        return x * 2 if torch_compat.is_compiling() else x * 3

    assert not torch_compat.is_compiling()
    try:
        compiled = torch.compile(forward, backend='eager')(torch.ones(2))
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, torch.full((2, ), 2.))
    assert torch.equal(forward(torch.ones(2)), torch.full((2, ), 3.))


def test_autocast_state_restores_the_forward_state():
    """What a hand-written backward needs to run under its forward's autocast."""
    assert torch_compat.autocast_state('cpu')['enabled'] is False
    with torch.autocast('cpu', dtype=torch.bfloat16):
        state = torch_compat.autocast_state('cpu')
    assert state == dict(device_type='cpu', dtype=torch.bfloat16, enabled=True)
    with torch.autocast(**state):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16


class _Unlisted:
    """A class no allow-list holds."""


def test_weights_only_default_is_what_torch_load_does(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save({'x': _Unlisted()}, path)
    if torch_compat.load_defaults_to_weights_only():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path)
    else:
        assert isinstance(torch.load(path)['x'], _Unlisted)


def _round_trip(obj, **save_args):
    buffer = io.BytesIO()
    torch.save(obj, buffer, **save_args)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False, pickle_module=restricted_pickle)


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_tensor_pickle_globals_read_what_torch_saves(zip_format):
    """Every kind of tensor data a checkpoint holds reads back through the restricted
    unpickler: all dtypes, parameters, views, non-contiguous and sparse tensors, sizes,
    devices, layouts and qschemes."""
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
              torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]
    base = torch.arange(12.).reshape(3, 4)
    saved = OrderedDict(
        tensors={str(d): (base * 3 - 5).to(d) for d in dtypes},
        parameter=torch.nn.Parameter(base.clone()),
        transposed=base.t(), view=base[1:, ::2],
        sparse=torch.eye(3).to_sparse(),
        meta=dict(size=torch.Size([3, 4]), device=torch.device('cpu'), layout=torch.strided,
                  dtype=torch.bfloat16, qscheme=torch.per_tensor_affine))
    loaded = _round_trip(saved, _use_new_zipfile_serialization=zip_format)
    for name, tensor in saved['tensors'].items():
        assert loaded['tensors'][name].dtype == tensor.dtype
        assert torch.equal(loaded['tensors'][name], tensor)
    assert isinstance(loaded['parameter'], torch.nn.Parameter)
    assert torch.equal(loaded['parameter'], saved['parameter'])
    assert torch.equal(loaded['transposed'], saved['transposed'])
    assert torch.equal(loaded['view'], saved['view'])
    assert torch.equal(loaded['sparse'].to_dense(), torch.eye(3))
    assert loaded['meta'] == saved['meta']


def test_onnx_export_uses_the_torchscript_exporter(tmp_path):
    """On every torch: a graph (no dynamo export program), dynamic sizes as asked."""
    onnx = pytest.importorskip('onnx', reason='the ONNX export needs the onnx package')
    out = tmp_path / 'linear.onnx'
    torch_compat.onnx_export_torchscript(
        torch.nn.Linear(3, 2).eval(), (torch.ones(1, 3), ), str(out), opset_version=17,
        input_names=['x'], output_names=['y'], dynamic_axes={'x': {0: 'batch'}})
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ['x']
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'batch'
