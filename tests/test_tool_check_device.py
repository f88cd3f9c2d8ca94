"""tools/check_device.py: the device check's table on the CPU (small size), a broken
gradient caught, clear refusals, and the toy-training rows (run on the pinned stack,
skipped with the reason in the library-only environments)."""
import contextlib
import importlib.util
import io
import json
import re

import pytest
import torch

from rest_mm.cli import check_device
from rest_mm.fused_attention import MixedHeadAttentionFunction

SIZE = '32x48'  # four stages (strides 4 to 32) in seconds on a CPU
ROW = re.compile(r'^\| (.+?) \| (float32|autocast bfloat16|autocast float16|amp float16) \| '
                 r'(\S+) \| (\S+) \| (pass|FAIL|skip) \| (\S+) \| (\S+) \| (.*) \|$', re.M)
HAS_OPENMMLAB = all(importlib.util.find_spec(name) for name in ('mmdet', 'mmseg'))
TOY_CONFIGS = [path.stem for path in check_device.toy_configs()]


def run_tool(argv):
    """``main(argv)``: its exit status, standard output and the table's rows."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        check_device.main(argv)
    text = out.getvalue()
    return exit_info.value.code, text, ROW.findall(text)


@pytest.fixture(scope='module')
def default_run(tmp_path_factory):
    path = tmp_path_factory.mktemp('check') / 'rows.json'
    status, text, rows = run_tool(['--device', 'cpu', '--size', SIZE, '--checks', 'backbone',
                                   'attention', '--json', str(path)])
    return status, text, rows, path


@pytest.mark.slow
def test_table_has_a_passing_row_for_every_check(default_run):
    """Both default backbones, outputs and gradients, float32 and CPU autocast bfloat16,
    and v1's attention backward: measured errors (nonzero: the dtypes really round) within
    tolerances, times and memory filled in; the JSON holds the same rows."""
    status, text, rows, path = default_run
    assert status == 0, text
    expected = [(f'{arch} {what}', dtype) for arch in check_device.DEFAULT_ARCHS
                for what, dtypes in (('outputs', 0), ('gradients', 0),
                                     ('attention backward', 1))
                if not dtypes or arch.startswith('rest_')
                for dtype in ('float32', 'autocast bfloat16')]
    assert sorted((r[0], r[1]) for r in rows) == sorted(expected)
    for check, dtype, error, tolerance, result, seconds, peak, note in rows:
        assert result == 'pass', (check, dtype, note)
        assert 0 < float(error) <= float(tolerance), (check, dtype)
        assert float(seconds) >= 0 and float(peak) >= 0
    assert text.startswith('# torch ') and 'peak memory: growth of the process peak RSS' in text
    saved = json.loads(path.read_text())
    assert [(r['check'], r['dtype'], r['passed']) for r in saved['rows']] == \
        [(r[0], r[1], True) for r in rows]
    assert saved['size'] == [32, 48]
    assert [p.name for p in path.parent.iterdir()] == ['rows.json']  # no temporary left


def test_broken_gradient_fails_with_nonzero_exit(monkeypatch):
    """v1's hand-written backward made 1% wrong in the query gradient, below float64 only
    (so the float64 reference stays right): the attention check and the backbone's
    gradients fail in float32, its outputs still pass, and the exit status says so."""
    original = MixedHeadAttentionFunction._backward

    def perturbed(ctx, grad_out):
        grads = original(ctx, grad_out)
        if grad_out.dtype == torch.float64:
            return grads
        return (grads[0] * 1.01, *grads[1:])

    monkeypatch.setattr(MixedHeadAttentionFunction, '_backward', staticmethod(perturbed))
    status, text, rows = run_tool(['--device', 'cpu', '--size', SIZE, '--archs', 'rest_lite',
                                   '--dtypes', 'float32', '--checks', 'backbone', 'attention'])
    assert status == 1, text
    results = {(r[0], r[1]): r[4] for r in rows}
    assert results[('rest_lite attention backward', 'float32')] == 'FAIL'
    assert results[('rest_lite gradients', 'float32')] == 'FAIL'
    assert results[('rest_lite outputs', 'float32')] == 'pass'
    assert 'FAILED: ' in text


def test_comparison_flags_non_finite_and_missing_tensors():
    exact = {'a': torch.ones(3, dtype=torch.float64), 'b': torch.ones(2, dtype=torch.float64)}
    plain = {'a': torch.ones(3), 'b': torch.ones(2)}
    meter = check_device.Meter(torch.device('cpu'))
    good = check_device.compare('x', 'float32', torch.float32, plain, plain, exact, meter)
    assert good.passed and good.max_error == 0
    bad = check_device.compare('x', 'float32', torch.float32,
                               {'a': torch.tensor([1., float('nan'), 1.])}, plain, exact, meter)
    assert not bad.passed and 'a not finite' in bad.note and 'b missing' in bad.note


def test_tolerance_grows_with_the_plain_error_and_the_dtype():
    assert check_device.rounding_tolerance(0., 1., torch.float32) == \
        check_device.ULPS * torch.finfo(torch.float32).eps
    assert check_device.rounding_tolerance(1e-3, 1., torch.float32) > 1e-3 * \
        check_device.RUNS_SLACK
    assert check_device.rounding_tolerance(0., 1., torch.bfloat16) > \
        check_device.rounding_tolerance(0., 1., torch.float16) > \
        check_device.rounding_tolerance(0., 1., torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_cuda_without_cuda_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_device.main(['--device', 'cuda'])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'CUDA is not available' in err and '--device cpu' in err


@pytest.mark.parametrize('argv, message', [
    (['--archs', 'rest_tiny'], 'unknown preset(s) rest_tiny; the presets are rest_lite'),
    (['--size', '32'], 'must look like 800x1344'),
    (['--json', '/nonexistent/folder/rows.json'], 'its folder does not exist'),
    (['--dtypes', 'float16'], '--dtypes float16: not checked on cpu'),
    (['--size', '32x32'], 'the last stage (stride 32) would be 1x1'),
])
def test_bad_arguments_are_refused_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_device.parse_args(['--device', 'cpu'] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(HAS_OPENMMLAB, reason='mmdet and mmseg are installed (the pinned stack)')
def test_training_rows_are_skipped_with_the_reason_without_openmmlab():
    status, text, rows = run_tool(['--device', 'cpu', '--checks', 'train'])
    assert status == 0, text
    assert [r[0] for r in rows] == [f'train {name}' for name in TOY_CONFIGS]
    for row in rows:
        assert row[4] == 'skip' and 'not installed (library-only env)' in row[7], row


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OPENMMLAB, reason='needs mmdet and mmseg (the pinned stack, .venv)')
def test_one_training_iteration_of_each_toy_config(tmp_path):
    """As tools/train.py builds each toy config, on generated toy images, one iteration in
    float32 on the CPU: a finite loss, time and peak memory measured."""
    status, text, rows = run_tool(['--device', 'cpu', '--checks', 'train',
                                   '--json', str(tmp_path / 'train.json')])
    assert status == 0, text
    assert [r[0] for r in rows] == [f'train {name}' for name in TOY_CONFIGS]
    for check, dtype, _, _, result, seconds, peak, note in rows:
        assert dtype == 'float32' and result == 'pass', (check, note)
        assert float(seconds) > 0 and float(peak) >= 0
        assert re.fullmatch(r'loss \S+', note) and float(note.split()[1]) > 0
