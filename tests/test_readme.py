"""Every tool command in the README names a script that exists, and every option it uses
is one the script accepts, so the README cannot drift from the tools. (What the commands
do is tested in the other files; `make test` and `make demo` are run by CI and
tests/test_tool_main_job.py.)"""
import re

import pytest

from testlib import REPO, tool_help

COMMAND = re.compile(r'^(?:[A-Z_]+=\S+ )*(python|bash) (tools/\S+)(.*)$')


def _readme_commands():
    text = (REPO / 'README.md').read_text()
    blocks = re.findall(r'```bash\n(.*?)```', text, flags=re.S)
    commands = []
    for line in '\n'.join(blocks).replace('\\\n', ' ').splitlines():  # join continuations
        line = line.split('#')[0].strip()
        match = COMMAND.match(line)
        if match:
            command = (match[2], re.findall(r'(?<!\S)(--[a-z][a-z0-9-]*)', match[3]))
            if command not in commands:  # each script and set of options is checked once
                commands.append(command)
    return commands


def test_readme_has_tool_commands():
    scripts = {script for script, _ in _readme_commands()}
    assert {'tools/train.py', 'tools/test.py', 'tools/dist_train.sh', 'tools/demo.py',
            'tools/visualize.py', 'tools/export_onnx.py', 'tools/convert_weights.py',
            'tools/benchmark.py', 'tools/get_flops.py'} <= scripts


@pytest.mark.parametrize('script, options', _readme_commands(),
                         ids=[f'{s} {" ".join(o)}' for s, o in _readme_commands()])
def test_readme_command_matches_its_tool(script, options):
    path = REPO / script
    assert path.is_file(), f'README names {script}, which does not exist'
    if path.suffix != '.py':
        return
    result = tool_help(script)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in options:
        assert option in result.stdout, f'{script} does not accept {option}'


def test_project_layout_names_every_library_module():
    """The README's layout lists each module of the library and each subpackage."""
    text = (REPO / 'README.md').read_text()
    layout = text[text.index('## Project layout'):text.index('## Citation')]
    for path in (REPO / 'rest_mm').glob('*.py'):
        assert path.name in layout, f'README "Project layout" does not list rest_mm/{path.name}'
    for package in ('testing/', 'cli/'):
        assert package in layout
