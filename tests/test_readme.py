"""Every tool command in README.md and docs/*.md names a script that exists, and every option
it uses is one the script accepts, so the pages cannot drift from the tools. README.md stays
short (at most 250 lines) and its "Project layout" names every module. (What the commands
do is tested in the other files; `make test` and `make demo` are run by CI and
tests/test_tool_main_job.py; the generated tables by tests/test_tool_make_docs.py.)"""
import re

import pytest

from testlib import REPO, tool_help

COMMAND = re.compile(r'^(?:[A-Z_]+=\S+ )*(python|bash) (tools/\S+)(.*)$')
PAGES = [REPO / 'README.md'] + sorted((REPO / 'docs').glob('*.md'))
README_MAX_LINES = 250


def _commands():
    """``(script, options)`` of each command in the pages' bash blocks, each pair once."""
    commands = []
    for page in PAGES:
        blocks = re.findall(r'```bash\n(.*?)```', page.read_text(), flags=re.S)
        for line in '\n'.join(blocks).replace('\\\n', ' ').splitlines():  # join continuations
            line = line.split('#')[0].strip()
            match = COMMAND.match(line)
            if match:
                command = (match[2], re.findall(r'(?<!\S)(--[a-z][a-z0-9-]*)', match[3]))
                if command not in commands:  # each script and set of options is checked once
                    commands.append(command)
    return commands


def test_docs_pages_exist_and_the_readme_links_each():
    readme = (REPO / 'README.md').read_text()
    assert len(PAGES) > 1, 'docs/ has no pages'
    for page in PAGES[1:]:
        assert f'](docs/{page.name})' in readme, f'README.md does not link docs/{page.name}'


def test_readme_is_short():
    lines = (REPO / 'README.md').read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f'README.md has {len(lines)} lines; at most {README_MAX_LINES}: move details to docs/')


def test_readme_has_tool_commands():
    scripts = {script for script, _ in _commands()}
    assert {'tools/train.py', 'tools/test.py', 'tools/dist_train.sh', 'tools/demo.py',
            'tools/visualize.py', 'tools/export_onnx.py', 'tools/convert_weights.py',
            'tools/benchmark.py', 'tools/get_flops.py', 'tools/make_docs.py'} <= scripts


@pytest.mark.parametrize('script, options', _commands(),
                         ids=[f'{s} {" ".join(o)}' for s, o in _commands()])
def test_readme_command_matches_its_tool(script, options):
    path = REPO / script
    assert path.is_file(), f'a page names {script}, which does not exist'
    if path.suffix != '.py':
        return
    result = tool_help(script)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in options:
        assert option in result.stdout, f'{script} does not accept {option}'


def test_project_layout_names_every_library_module():
    """The README's layout lists each module of the library, of its subpackages (cli/,
    testing/, ...) and each subpackage."""
    text = (REPO / 'README.md').read_text()
    layout = text[text.index('## Project layout'):text.index('## Citation')]
    library = REPO / 'rest_mm'
    for path in sorted(library.rglob('*.py')):
        if path.name == '__init__.py' and path.parent != library:
            assert f'{path.parent.name}/' in layout, (
                f'README "Project layout" does not list the package {path.parent.name}/')
            continue
        assert path.name in layout, (
            f'README "Project layout" does not list {path.relative_to(REPO)}')
