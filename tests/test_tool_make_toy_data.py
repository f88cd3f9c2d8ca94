"""tools/make_toy_data.py on its command line."""
import pytest

from rest_mm.cli import make_toy_data as tool


def test_make_toy_data_cli(tmp_path, capsys):
    tool.main(['--out-dir', str(tmp_path), '--num-train', '2', '--num-val', '1', '--height',
               '40', '--width', '40', '--min-size', '8', '--max-size', '16'])
    assert 'toy data generated' in capsys.readouterr().out
    assert len(list((tmp_path / 'toy_ade/images/training').glob('*.jpg'))) == 2
    with pytest.raises(SystemExit, match='min_size <= max_size'):
        tool.main(['--out-dir', str(tmp_path), '--min-size', '30', '--max-size', '20'])
