"""rest_mm.registry and the package boundary: importing rest_mm registers the two
backbones in both libraries and nothing else, imports no tool support, and the package's
modules import each other without a cycle."""
import ast
import json
import subprocess
import sys
import textwrap

import pytest

from testlib import REPO, needs_full_stack


@needs_full_stack
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


@needs_full_stack
def test_import_registers_the_backbones_and_nothing_else():
    """In a fresh interpreter: every registry entry that comes from rest_mm, in mmengine's,
    mmdet's and mmseg's registries, and the rest_mm modules that got imported."""
    script = textwrap.dedent("""
        import json, sys
        import rest_mm
        import mmengine.registry, mmdet.registry, mmseg.registry
        from mmengine.registry import Registry
        entries = sorted(
            f'{library.__name__}.{name}:{key}'
            for library in (mmengine.registry, mmdet.registry, mmseg.registry)
            for name, registry in vars(library).items() if isinstance(registry, Registry)
            for key, module in registry.module_dict.items()
            if getattr(module, '__module__', '').startswith('rest_mm'))
        modules = sorted(m for m in sys.modules if m.startswith('rest_mm'))
        print(json.dumps(dict(entries=entries, modules=modules)))
    """)
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found['entries'] == ['mmdet.registry.MODELS:ResT', 'mmdet.registry.MODELS:ResTV2',
                                'mmseg.registry.MODELS:ResT', 'mmseg.registry.MODELS:ResTV2']
    assert not [m for m in found['modules'] if m.startswith(('rest_mm.cli', 'rest_mm.testing'))]


def _package_imports() -> dict:
    """{module: rest_mm modules it imports}, read from the source (imports inside
    functions included, so that a deferred import cannot hide a cycle)."""
    graph = {}
    for path in sorted((REPO / 'rest_mm').rglob('*.py')):
        parts = path.relative_to(REPO).with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        package = name if parts[-1] == '__init__' else name.rpartition('.')[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith('rest_mm'))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1]
                                    + ([base] if base else []))
                if base.startswith('rest_mm'):
                    # `from . import presets` imports a module; `from .rest import ResT` a name
                    imported.update(f'{base}.{a.name}' if f'{base}.{a.name}' in _MODULES else base
                                    for a in node.names)
        graph[name] = imported - {name}
    return graph


_MODULES = {'.'.join(p for p in path.relative_to(REPO).with_suffix('').parts if p != '__init__')
            for path in (REPO / 'rest_mm').rglob('*.py')}


@needs_full_stack
def test_package_has_no_import_cycle():
    graph = _package_imports()
    assert set(graph) == _MODULES
    state = {}

    def visit(module, path):
        if state.get(module) == 'done':
            return
        assert state.get(module) != 'open', f'import cycle: {" -> ".join(path + [module])}'
        state[module] = 'open'
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + [module])
        state[module] = 'done'

    for module in sorted(graph):
        visit(module, [])


def test_library_never_imports_tool_support():
    """Only rest_mm.cli itself imports rest_mm.cli; nothing in the library imports the
    reference models of rest_mm.testing."""
    for module, imported in _package_imports().items():
        if not module.startswith('rest_mm.cli'):
            assert not [m for m in imported if m.startswith('rest_mm.cli')], module
        if not module.startswith(('rest_mm.cli', 'rest_mm.testing')):
            assert not [m for m in imported if m.startswith('rest_mm.testing')], module
