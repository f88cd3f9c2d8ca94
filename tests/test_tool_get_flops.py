"""tools/get_flops.py: parameter and FLOP counts of backbones and configs."""
from rest_mm.cli import get_flops
from rest_mm.presets import PRESET_NAMES

from testlib import CONFIG_DIR, needs_full_stack


def _table(text):
    return {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip('|').split('|')] for line in text.splitlines()
             if line.startswith('| ') and not line.startswith('| backbone')
             and not line.startswith('| config'))}


def test_flops_at_224_match_the_published_numbers(capsys):
    get_flops.main(['--no-configs'])
    table = _table(capsys.readouterr().out)
    assert set(table) == set(PRESET_NAMES)
    for name, (_, _, published_params, flops, convention, published_flops) in table.items():
        if name.startswith('restv2'):
            assert abs(float(flops) / float(published_flops) - 1) < 0.005, name
        else:
            # The published v1 figures are 7-10 % below the complete count; without the
            # attention products and the stem's conv2 (see get_flops' docstring) they agree
            # to rounding for lite, small and large, and to 0.054 G for base.
            assert float(flops) > float(published_flops), name
            assert abs(float(convention) - float(published_flops)) < 0.06, name
    for name, (_, params, published_params, *_) in table.items():  # with a 1000-class head
        # ResTv2's paper gives whole millions, ResT's two decimals
        assert abs(float(params) - float(published_params)) < (
            0.5 if name.startswith('restv2') else 0.05), name


@needs_full_stack
def test_get_flops_counts_a_config_model(capsys):
    config = CONFIG_DIR / 'segmentation/upernet_restv2_tiny_ade20k.py'
    get_flops.main(['--backbones', '--configs', str(config), '--config-size', '64x128'])
    row = _table(capsys.readouterr().out)['upernet_restv2_tiny_ade20k']
    assert row[0] == '64×128' and float(row[1]) > 50 and float(row[2]) > 0
