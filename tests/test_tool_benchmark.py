"""tools/benchmark.py: timing, comparison on the same weights, memory, plots, float32
against autocast dtypes, whole-model inference in phases."""
import platform
import re

import pytest
import torch
from torch import nn

from rest_mm.cli import benchmark, precision
from rest_mm.cli.precision import native_bf16_flags
from rest_mm.torch_compat import cpu_autocast_supports

from testlib import TOY_CONFIG_DIR, needs_full_stack

TOY_RETINANET = str(TOY_CONFIG_DIR / 'retinanet_rest_small_toy.py')
TOY_UPERNET = str(TOY_CONFIG_DIR / 'upernet_restv2_tiny_toy.py')


@needs_full_stack
def test_benchmark_compares_and_plots(capsys, tmp_path):
    plot = tmp_path / 'latency.png'
    benchmark.main(['rest_lite', 'straightforward_rest_lite', 'pvtv2_b1', '--compare',
                    '--size', '64x96', '48x48', '--runs', '2', '--warmup', '0',
                    '--plot', str(plot)])
    out = capsys.readouterr().out
    check = re.search(r'rest_lite vs straightforward_rest_lite on the same weights: max '
                      r'\|difference\| (\S+) in float64, (\S+) in float32', out)
    assert check and float(check[1]) < 1e-9 and float(check[2]) < 1e-3
    rows = re.findall(r'^\| (\S+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$', out, re.M)
    assert [r[0] for r in rows] == ['rest_lite', 'straightforward_rest_lite', 'pvtv2_b1'] * 2
    assert all(float(seconds) > 0 for _, seconds, _, _ in rows)
    assert 'rest_lite: ' in out and '× faster than straightforward' in out
    assert plot.stat().st_size > 1000


def test_benchmark_training_step_and_memory(capsys):
    benchmark.main(['restv2_tiny', '--size', '64x64', '--batch', '2', '--mode', 'train',
                    '--runs', '1', '--warmup', '0', '--memory'])
    out = capsys.readouterr().out
    row = re.search(r'^\| restv2_tiny \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$', out, re.M)
    assert row and float(row[1]) > 0 and int(row[3]) > 0


@pytest.mark.parametrize('args, message', [
    (['vgg16'], 'unknown model'),
    (['rest_small', '--size', '800'], 'HxW'),
    (['rest_small', '--size', '0x64'], 'must be positive'),
    ([], '--compare'),
    ([TOY_RETINANET, '--plot', TOY_RETINANET], 'the output is the config'),  # issue 10
    (['configs/nowhere.py'], "config 'configs/nowhere.py' does not exist"),
    (['mmdet::nowhere/none.py'], "config 'mmdet::nowhere/none.py'"),
    (['timm::resnet.py'], 'no library this tool knows'),
    (['rest_small', '--mode', 'predict'], "'rest_small' is a backbone"),
    (['rest_small', '--dtype', 'int8'], 'invalid choice'),
    (['rest_small', '--dtype', 'bfloat16', 'bfloat16'], 'bfloat16 named more than once'),
    ([TOY_RETINANET, '--mode', 'predict', '--dtype', 'float16'], 'float16 only with'),
    (['rest_small', 'rest_lite', '--checkpoint', 'none'], 'one value per model'),
    (['rest_small', '--checkpoint', 'nowhere.pth'], "checkpoint 'nowhere.pth' does not exist"),
    (['swin_tiny', '--checkpoint', 'nowhere.pth'], 'our presets and configs only'),
    (['rest_small', '--plot', 'no/such/folder/latency.png'], 'does not exist'),
])
def test_benchmark_refuses_bad_arguments_clearly(capsys, args, message):
    with pytest.raises(SystemExit):
        benchmark.main(args)
    assert message in capsys.readouterr().err


def test_benchmark_refuses_weights_that_do_not_load(tmp_path):
    checkpoint = tmp_path / 'not_weights.pth'
    checkpoint.write_text('not a checkpoint')
    with pytest.raises(SystemExit, match=f'{checkpoint} does not load into rest_lite: .*could '
                                         f'not be read'):
        benchmark.main(['rest_lite', '--checkpoint', str(checkpoint)])


def test_benchmark_refuses_an_unwritable_plot_before_timing(capsys, read_only_dir):
    with pytest.raises(SystemExit):
        benchmark.main(['rest_small', '--plot', str(read_only_dir / 'latency.png')])
    assert 'not writable' in capsys.readouterr().err


def _rows(out: str, model: str) -> dict:
    """The precision table's rows of ``model``: {dtype: cells after the dtype}."""
    rows = re.findall(rf'^\| {re.escape(model)} \| (\w+) \| (.*) \|$', out, re.M)
    return {dtype: [c.strip() for c in cells.split('|')] for dtype, cells in rows}


def test_benchmark_float32_and_bfloat16_side_by_side(capsys):
    benchmark.main(['rest_lite', '--size', '64x64', '--dtype', 'float32', 'bfloat16',
                    '--runs', '1', '--warmup', '0'])
    out = capsys.readouterr().out
    native = native_bf16_flags()
    assert ('native here (' + ', '.join(native) + ')' if native else 'NOT native here') in out
    assert '| model | dtype | forward s @64x64 ×1 | images/s | × float32 | worst rel. L2' in out
    rows = _rows(out, 'rest_lite')
    assert list(rows) == ['float32', 'bfloat16']
    seconds, per_second, ratio, error = rows['bfloat16']
    assert float(seconds) > 0 and float(per_second) > 0 and float(ratio) > 0
    assert rows['float32'][2:] == ['1.00', '—']
    stages = re.search(r'^rest_lite bfloat16: relative L2 error against float32 per stage: '
                       r'(.*)$', out, re.M)[1].split()
    assert len(stages) == 4 and max(float(e) for e in stages) == pytest.approx(float(error))
    # bfloat16 keeps 8 significant bits: an error, but not one that loses the output
    # (test_precision_errors_measure_the_rounding_of_each_dtype checks its size)
    assert 1e-4 < float(error) < 1


@pytest.mark.skipif(not cpu_autocast_supports(torch.float16),
                    reason=f'no float16 CPU autocast in torch {torch.__version__}')
def test_precision_errors_measure_the_rounding_of_each_dtype():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3)
    errors = benchmark.precision_errors(conv, (16, 16), ['float32', 'bfloat16', 'float16'])
    assert errors['float32'] == [0.]
    # 8 against 11 significant bits: bfloat16 rounds about 8 times worse than float16
    assert 0 < errors['float16'][0] * 2 < errors['bfloat16'][0] < 0.05

    class Exact(nn.Module):  # no op that autocast lowers: nothing to round
        def forward(self, x):
            return [x * 2, x + 1]
    assert benchmark.precision_errors(Exact(), (8, 8), ['bfloat16']) == {'bfloat16': [0., 0.]}


def _check_predict_rows(out: str, model: str, dtypes, detector: bool) -> dict:
    rows = _rows(out, model)
    assert list(rows) == list(dtypes)
    for cells in rows.values():
        pre, forward, post, total = (float(c) for c in cells[:4])
        # each printed to 4 significant digits
        assert min(pre, forward, post) > 0 and total >= (pre + forward + post) * (1 - 1e-3)
        assert float(cells[-1]) >= 0 if detector else cells[-1] == '—'
    return rows


@pytest.mark.slow  # builds whole models; bfloat16 is emulated on CPUs without it
@needs_full_stack
def test_benchmark_whole_detector_in_phases_float32_and_bfloat16(capsys):
    benchmark.main([TOY_RETINANET, '--mode', 'predict', '--size', '64x64',
                    '--dtype', 'float32', 'bfloat16', '--runs', '1', '--warmup', '0'])
    out = capsys.readouterr().out
    assert ('| model | dtype | pre-processing s | forward s | post-processing s | total s '
            '@64x64 ×1 | images/s | × float32 | worst rel. L2 vs float32 | detections/image |'
            in out)
    rows = _check_predict_rows(out, TOY_RETINANET, ['float32', 'bfloat16'], detector=True)
    assert float(rows['bfloat16'][-2]) > 0
    levels = re.search(rf'^{re.escape(TOY_RETINANET)} bfloat16: relative L2 error against '
                       rf'float32 per feature level: (.*)$', out, re.M)[1].split()
    assert len(levels) == 5  # the FPN's outputs
    assert f'# {TOY_RETINANET}: random weights (mmengine init_weights)' in out
    assert 'its time is not representative' in out


@pytest.mark.slow  # builds whole models
@needs_full_stack
def test_benchmark_whole_segmentor_with_trained_weights(capsys, tmp_path):
    checkpoint = tmp_path / 'upernet.pth'
    torch.save(dict(state_dict=benchmark.build_model(TOY_UPERNET)[0].state_dict()), checkpoint)
    capsys.readouterr()
    benchmark.main([TOY_UPERNET, '--mode', 'predict', '--size', '64x64', '--runs', '1',
                    '--warmup', '0', '--checkpoint', str(checkpoint)])
    out = capsys.readouterr().out
    _check_predict_rows(out, TOY_UPERNET, ['float32'], detector=False)
    assert f'# {TOY_UPERNET}: weights {checkpoint}' in out
    assert 'not representative' not in out


@pytest.mark.slow  # builds whole models
@needs_full_stack
def test_benchmark_whole_mmdet_config_without_downloads(capsys):
    name = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
    benchmark.main([name, '--mode', 'predict', '--size', '64x64', '--runs', '1',
                    '--warmup', '0'])
    out = capsys.readouterr().out
    assert (f'# {name}: pretrained loading switched off (nothing is downloaded): '
            f'model.backbone.init_cfg (torchvision://resnet50)') in out
    _check_predict_rows(out, name, ['float32'], detector=True)


@pytest.mark.skipif(cpu_autocast_supports(torch.float16),
                    reason=f'torch {torch.__version__} has float16 CPU autocast')
def test_float16_is_refused_where_cpu_autocast_lacks_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['rest_lite', '--size', '32x32', '--dtype', 'float32', 'float16'])
    assert exit_info.value.code == 2
    assert 'CPU autocast in float16 needs a newer torch' in capsys.readouterr().err


def test_benchmark_matmul_rate(capsys):
    """``--matmul-rate``: the float32 matmul's rate and each backbone's multiply-accumulates
    per second as a percentage of it (the figure of docs/performance.md)."""
    benchmark.main(['rest_lite', 'restv2_tiny', '--size', '64x64', '--runs', '2', '--warmup',
                    '0', '--matmul-rate'])
    out = capsys.readouterr().out
    assert re.search(r'^float32 matmul 2048x2048: [\d.]+ GMAC/s \(fastest run\)$', out, re.M)
    for name in ('rest_lite', 'restv2_tiny'):
        line = re.search(rf'^{name}: ([\d.]+) GMAC in ([\d.]+) s \(fastest run\) = ([\d.]+) '
                         rf'GMAC/s, (\d+) % of the matmul rate$', out, re.M)
        assert line and float(line[1]) > 0 and float(line[3]) > 0  # tiny: a few %
    assert re.findall(r'^\| (\S+) \|', out, re.M) == ['model', 'rest_lite', 'restv2_tiny']


@pytest.mark.parametrize('args, message', [
    (['rest_lite', '--matmul-rate', '--mode', 'train'], '--matmul-rate compares'),
    (['rest_lite', '--matmul-rate', '--dtype', 'bfloat16'], '--matmul-rate compares'),
    ([TOY_RETINANET, '--matmul-rate'], '--matmul-rate compares'),
    (['rest_lite', '--device', 'tpu'], 'invalid choice'),
])
def test_benchmark_refuses_matmul_rate_and_device_misuse(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a CUDA GPU')
def test_benchmark_refuses_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(['rest_lite', '--device', 'cuda'])
    assert 'finds no CUDA GPU on this machine; use --device cpu' in capsys.readouterr().err


def test_cpu_model_name_comes_from_cpuinfo(tmp_path):
    """The CPU line of the benchmark's header (the flags: test_mixed_precision.py)."""
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx512_bf16 '
                       'amx_bf16 sse\n\nprocessor\t: 1\nmodel name\t: Some Xeon\n')
    assert precision.cpu_model_name(str(cpuinfo)) == 'Some Xeon'
    assert precision.native_bf16_flags(str(cpuinfo)) == ['amx_bf16', 'avx512_bf16']
    # without the file: the platform's name, or a placeholder (never an empty string)
    assert precision.cpu_model_name(str(tmp_path / 'none')) == (platform.processor()
                                                                 or 'unknown CPU')
