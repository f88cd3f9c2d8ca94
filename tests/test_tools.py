"""tools/: thin entry points into ``rest_mm.cli``, each answering ``--help``."""
import ast

import pytest

from testlib import REPO, TOOLS_DIR, tool_help

PYTHON_TOOLS = sorted(path.name for path in TOOLS_DIR.glob('*.py'))


def test_tools_are_thin_entry_points():
    """Each tool is a docstring, an import of its ``rest_mm.cli`` module's ``main`` and a
    call: no code of its own, no ``sys.path`` edit, no loading of a sibling by path; and
    every ``rest_mm.cli`` module with a ``main`` has its tool."""
    assert PYTHON_TOOLS
    for name in PYTHON_TOOLS:
        text = (TOOLS_DIR / name).read_text()
        tree = ast.parse(text)
        assert len(text.splitlines()) <= 10, name
        assert 'sys.path' not in text and 'importlib' not in text, name
        docstring = ast.get_docstring(tree)
        assert docstring and '\n' not in docstring, name
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        from_imports = [(node.module, [alias.name for alias in node.names])
                        for node in imports if isinstance(node, ast.ImportFrom)]
        assert from_imports == [(f'rest_mm.cli.{name[:-3]}', ['main'])], name
        assert {alias.name for node in imports if isinstance(node, ast.Import)
                for alias in node.names} <= {'sys'}, name
        assert "if __name__ == '__main__':" in text and 'main()' in text, name
    with_main = sorted(path.stem + '.py' for path in (REPO / 'rest_mm' / 'cli').glob('*.py')
                       if any(isinstance(node, ast.FunctionDef) and node.name == 'main'
                              for node in ast.parse(path.read_text()).body))
    assert with_main == PYTHON_TOOLS


def test_launch_scripts_run_the_installed_package():
    """The shell launchers start the tools as they are; the package comes from the install,
    not from a path put in front of it."""
    scripts = sorted(TOOLS_DIR.glob('*.sh'))
    assert scripts
    for script in scripts:
        assert 'PYTHONPATH' not in script.read_text(), script.name


@pytest.mark.parametrize('script', PYTHON_TOOLS)
def test_tool_answers_help(script):
    result = tool_help(f'tools/{script}')
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith('usage: '), result.stdout[:500]
