"""tools/benchmark.py: timing, comparison on the same weights, memory, plots."""
import re

import pytest

from rest_mm.cli import benchmark

from testlib import TOY_CONFIG_DIR

TOY_RETINANET = str(TOY_CONFIG_DIR / 'retinanet_rest_small_toy.py')


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
    ([], '--compare'),
    ([TOY_RETINANET, '--plot', TOY_RETINANET], 'the output is the config'),  # issue 10
])
def test_benchmark_refuses_bad_arguments_clearly(capsys, args, message):
    with pytest.raises(SystemExit):
        benchmark.main(args)
    assert message in capsys.readouterr().err
