"""Registration in both libraries from a config's custom_imports, in a fresh
interpreter, and the weight converter's command line."""
import subprocess
import sys
import textwrap

import pytest


@pytest.mark.parametrize('library', ['mmdet', 'mmseg'])
def test_custom_imports_register_both_backbones(tmp_path, library):
    config = tmp_path / 'my_config.py'
    config.write_text(textwrap.dedent("""
        custom_imports = dict(imports=['rest_mm'], allow_failed_imports=False)
        v1 = dict(type='ResT', arch='lite', out_indices=(1, 2, 3))
        v2 = dict(type='ResTV2', arch='tiny')
    """))
    script = textwrap.dedent(f"""
        import sys, torch
        assert 'rest_mm' not in sys.modules
        from mmengine.config import Config
        from {library}.registry import MODELS
        cfg = Config.fromfile({str(config)!r})
        v1, v2 = MODELS.build(cfg.v1), MODELS.build(cfg.v2)
        print(type(v1).__name__, [o.shape[1] for o in v1(torch.randn(1, 3, 40, 56))])
        print(type(v2).__name__, [o.shape[1] for o in v2(torch.randn(1, 3, 40, 56))])
    """)
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)

    assert result.returncode == 0, result.stderr
    assert 'ResT [128, 256, 512]' in result.stdout
    assert 'ResTV2 [96, 192, 384, 768]' in result.stdout
