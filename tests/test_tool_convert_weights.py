"""tools/convert_weights.py on the command line."""
import subprocess
import sys

import torch

from rest_mm import convert_checkpoint

from testlib import REPO


def test_convert_weights_tool(tmp_path, reference_dir):
    reference = torch.load(reference_dir / 'rest_v2_tiny.pt', weights_only=True)
    src, dst = tmp_path / 'released.pth', tmp_path / 'converted.pth'
    torch.save({'model': reference['state_dict']}, src)
    result = subprocess.run([sys.executable, str(REPO / 'tools' / 'convert_weights.py'),
                             str(src), str(dst)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'these weights fit ResTV2' in result.stdout
    converted = torch.load(dst, weights_only=True)['state_dict']
    expected = convert_checkpoint(reference['state_dict'])
    assert list(converted) == list(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)

    bad = tmp_path / 'other.pth'
    torch.save({'model': {'layer.weight': torch.zeros(2)}}, bad)
    result = subprocess.run([sys.executable, str(REPO / 'tools' / 'convert_weights.py'),
                             str(bad), str(tmp_path / 'x.pth')], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and 'holds no ResT/ResTV2 backbone weights' in result.stderr
