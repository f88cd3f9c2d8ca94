"""rest_mm/cli/errors.py: one top-level handler for every tool (issue 16). A user error is
one line ``tools/NAME.py: error: ...`` and exit status 2, its traceback behind ``--debug``;
a bug of ours keeps its stack. Then the user errors that gave raw tracebacks, through the
tools themselves."""
import argparse
import errno
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rest_mm import ResT
from rest_mm.cli import errors

from testlib import REPO, TOOLS_DIR, TOY_CONFIG_DIR, data_roots, needs_full_stack, write_image

TOY_CONFIG = str(TOY_CONFIG_DIR / 'retinanet_rest_small_toy.py')
# Every tool in rest_mm/cli/ (tools/NAME.py runs rest_mm.cli.NAME.main).
TOOLS = ('train', 'test', 'demo', 'visualize', 'export_onnx', 'convert_weights', 'benchmark',
         'get_flops', 'check_device', 'swap_backbone', 'make_toy_data', 'make_docs',
         'main_job')


def _tool(raises, name='faketool'):
    """A handled ``main`` with a ``--debug`` flag that raises ``raises``."""
    def main(argv=None):
        parser = argparse.ArgumentParser()
        errors.add_debug_argument(parser)
        parser.parse_args(argv)
        raise raises
    main.__module__ = f'rest_mm.cli.{name}'
    return errors.handled(main)


def _refused_run(tool: str, argv) -> str:
    """What ``tools/TOOL.py ARGV`` says on stderr, checked to be one line (besides the
    libraries' warnings) and exit status 2."""
    result = subprocess.run([sys.executable, str(TOOLS_DIR / f'{tool}.py'), *map(str, argv)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith('tools/')]
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    return lines[0]


def _refusal(capsys, main, argv) -> str:
    """What ``main(argv)`` says on stderr, checked to be one line and exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('tools/')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert str(exit_info.value) == lines[0]  # the exit carries the line
    return lines[0]


# --- the handler --------------------------------------------------------------------------
@pytest.mark.parametrize('error, line', [
    (ValueError('--size 0x0: must be positive'), '--size 0x0: must be positive'),
    (OSError(errno.ELOOP, os.strerror(errno.ELOOP), 'loop.pth'),
     f'loop.pth: {os.strerror(errno.ELOOP)}'),
    (FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), 'a.py'),
     f'a.py: {os.strerror(errno.ENOENT)}'),
    (KeyError("unknown preset 'rest_medium'"), "unknown preset 'rest_medium'"),
    (ValueError('first line\n  second line\n'), 'first line; second line'),
    (SyntaxError('There are syntax errors in config file x.py'),
     'There are syntax errors in config file x.py'),
    (errors.UserError('x.pth does not fit'), 'x.pth does not fit'),
])
def test_a_user_error_is_one_line_and_exit_status_2(capsys, error, line):
    assert _refusal(capsys, _tool(error), []) == f'tools/faketool.py: error: {line}'


@pytest.mark.parametrize('error', [TypeError('bad'), AttributeError('bad'), AssertionError(),
                                   KeyError('backbone'), RuntimeError('bad'), IndexError(1)])
def test_a_bug_keeps_its_stack(error):
    # a bare KeyError is a lookup in our code; a plain RuntimeError (not a CheckpointError) is ours
    with pytest.raises(type(error)):
        _tool(error)([])


def test_debug_shows_the_traceback_of_a_user_error(capsys):
    with pytest.raises(ValueError, match='--size'):
        _tool(ValueError('--size 0x0: must be positive'))(['--debug'])
    assert capsys.readouterr().err == ''


def test_a_tool_run_by_another_keeps_its_debug(capsys):
    # tools/main_job.py --debug runs tools/test.py's main, whose command line has no --debug
    inner = _tool(ValueError('bad checkpoint'), 'inner')

    def main(argv=None):
        parser = argparse.ArgumentParser()
        errors.add_debug_argument(parser)
        parser.parse_args(argv)
        inner([])
    main.__module__ = 'rest_mm.cli.outer'
    with pytest.raises(ValueError, match='bad checkpoint'):
        errors.handled(main)(['--debug'])
    assert capsys.readouterr().err == ''
    assert 'inner.py: error: bad checkpoint' in _refusal(capsys, errors.handled(main), [])


def test_a_checkpoint_error_of_the_weights_code_is_a_user_error(tmp_path):
    from rest_mm.weights import load_pretrained
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint')
    with pytest.raises(RuntimeError) as raised:
        load_pretrained(ResT(arch='lite'), str(garbage))
    assert errors.is_user_error(raised.value)


def test_a_class_given_an_argument_it_does_not_take_is_a_user_error():
    from mmengine.registry import Registry
    registry = Registry('test')

    @registry.register_module()
    class Backbone:
        def __init__(self, depth):
            if depth < 0:
                raise TypeError('a bug inside the constructor')

    with pytest.raises(TypeError) as raised:
        registry.build(dict(type='Backbone', depth=1, mlp_ratio=0))
    assert errors.is_user_error(raised.value)
    assert 'check the keys of the config' in errors.one_line(raised.value)
    with pytest.raises(TypeError) as raised:
        registry.build(dict(type='Backbone', depth=-1))
    assert not errors.is_user_error(raised.value)


def test_an_error_in_a_config_file_names_the_file_and_line(capsys, tmp_path):
    from rest_mm.cli import get_flops
    config = tmp_path / 'broken.py'
    config.write_text('model = dict(type="ResT")\nx = undefined_name\n')
    line = _refusal(capsys, get_flops.main, ['--backbones', '--configs', str(config)])
    assert line == (f"tools/get_flops.py: error: {config}, line 2: NameError: name "
                    f"'undefined_name' is not defined")


def test_a_config_value_of_another_type_than_its_base_is_a_user_error(tmp_path):
    from mmengine.config import Config
    (tmp_path / 'base.py').write_text('init_cfg = None\n')
    child = tmp_path / 'child.py'
    child.write_text("_base_ = ['base.py']\ninit_cfg = dict(type='Pretrained')\n")
    with pytest.raises(TypeError) as raised:
        Config.fromfile(str(child))
    assert errors.is_user_error(raised.value)


@pytest.mark.parametrize('name', TOOLS)
def test_every_tool_is_handled_and_takes_debug(capsys, name):
    module = importlib.import_module(f'rest_mm.cli.{name}')
    assert getattr(module.main, '__wrapped__', None) is not None  # errors.handled wraps it
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(['--help'])
    assert exit_info.value.code == 0 and '--debug' in capsys.readouterr().out


# --- raw tracebacks of issue 16, through the tools ----------------------------------------
@pytest.fixture
def symlink_loop(tmp_path) -> Path:
    loop = tmp_path / 'loop.pth'
    loop.symlink_to(loop)
    return loop


def test_convert_weights_symlink_loop(capsys, tmp_path, symlink_loop):
    from rest_mm.cli import convert_weights
    line = _refusal(capsys, convert_weights.main, [str(symlink_loop), str(tmp_path / 'o.pth')])
    assert line.startswith('tools/convert_weights.py: error: ') and str(symlink_loop) in line


def test_export_onnx_symlink_loop(capsys, tmp_path, symlink_loop):
    from rest_mm.cli import export_onnx
    line = _refusal(capsys, export_onnx.main,
                    ['rest_lite', str(symlink_loop), '--out', str(tmp_path / 'm.onnx')])
    assert line.startswith('tools/export_onnx.py: error: ') and 'loop.pth' in line


def test_visualize_symlink_loop(capsys, tmp_path, symlink_loop):
    from rest_mm.cli import visualize
    image = tmp_path / 'a.png'
    write_image(image, 20, 30)
    line = _refusal(capsys, visualize.main, [str(image), 'rest_lite', str(symlink_loop),
                                             '--out', str(tmp_path / 'v.png')])
    assert line.startswith('tools/visualize.py: error: ') and 'loop.pth' in line


@needs_full_stack
def test_demo_symlink_loop(capsys, tmp_path, symlink_loop):
    from rest_mm.cli import demo
    image = tmp_path / 'a.png'
    write_image(image, 20, 30)
    line = _refusal(capsys, demo.main, [str(image), TOY_CONFIG, str(symlink_loop),
                                        '--out-dir', str(tmp_path / 'out'), '--device', 'cpu'])
    assert line.startswith('tools/demo.py: error: ') and 'loop.pth' in line


def test_get_flops_refuses_a_missing_config_before_counting(capsys, monkeypatch, tmp_path):
    from rest_mm.cli import get_flops
    monkeypatch.setattr(get_flops, 'backbone_flops', lambda *a: pytest.fail('counted'))
    missing = tmp_path / 'missing.py'
    with pytest.raises(SystemExit) as exit_info:
        get_flops.main(['--configs', str(missing)])
    assert exit_info.value.code == 2
    assert f'--configs {missing}: no such config file' in capsys.readouterr().err


def test_benchmark_refuses_an_input_larger_than_the_memory(capsys, monkeypatch):
    from rest_mm.cli import benchmark
    monkeypatch.setattr(benchmark, '_available_memory_bytes', lambda: 16 * 2**30)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['rest_lite', '--size', '60000x60000'])
    assert exit_info.value.code == 2
    assert ('--size 60000x60000 (--batch 1): the input tensor alone needs 40.2 GiB, more than '
            'the 16.0 GiB of memory available') in capsys.readouterr().err
    args = benchmark.parse_args(['rest_lite', '--size', '800x1344'])  # 12 MiB: fine
    assert args.size == [(800, 1344)]


@needs_full_stack
def test_swap_backbone_checks_its_output_before_the_work(capsys, monkeypatch, tmp_path,
                                                         read_only_dir):
    from rest_mm.cli import swap_backbone
    monkeypatch.setattr(swap_backbone.Config, 'fromfile', lambda *a: pytest.fail('work'))
    folder = tmp_path / 'a_folder.py'
    folder.mkdir()
    config = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
    for out, message in ((folder, 'is a folder'), (read_only_dir / 'x.py', 'not writable')):
        line = _refusal(capsys, swap_backbone.main, [config, '--arch', 'rest_small',
                                                     '-o', str(out)])
        assert line.startswith('tools/swap_backbone.py: error: -o ') and message in line


def _wrong_outputs(tmp_path: Path, read_only_dir: Path, kind: str) -> list:
    """``(path, message pattern)``: outputs of ``kind`` ('file' or 'dir') that cannot be
    written."""
    folder, a_file = tmp_path / 'a_folder.x', tmp_path / 'a_file.x'
    folder.mkdir()
    a_file.write_text('x')
    wrong_kind = (folder, 'is a (folder|directory)') if kind == 'file' else (a_file, 'is a file')
    return [(read_only_dir / 'out.x', 'not writable'), wrong_kind,
            (a_file / 'out.x', 'is a file, not a folder')]


@pytest.mark.parametrize('tool, argv, kind', [
    ('convert_weights', lambda source, out: [source, out], 'file'),
    ('make_toy_data', lambda source, out: ['--out-dir', out], 'dir'),
    ('check_device', lambda source, out: ['--device', 'cpu', '--json', out], 'file'),
    pytest.param('main_job', lambda source, out: ['--work-dir', out], 'dir',
                 marks=needs_full_stack),  # its --cfg-options check reads the mmdet config
])
def test_tools_refuse_outputs_they_cannot_write_before_the_work(capsys, monkeypatch, tmp_path,
                                                                read_only_dir, tool, argv,
                                                                kind):
    module = importlib.import_module(f'rest_mm.cli.{tool}')
    for work in ('generate_toy_datasets', 'run_checks'):  # the work must not start
        if hasattr(module, work):
            monkeypatch.setattr(module, work, lambda *a, **k: pytest.fail('work started'))
    source = tmp_path / 'authors.pth'
    torch.save({'model': ResT(arch='lite').state_dict()}, source)
    for out, message in _wrong_outputs(tmp_path, read_only_dir, kind):
        with pytest.raises(SystemExit) as exit_info:
            module.main([str(a) for a in argv(source, out)])
        assert exit_info.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if str(out) in line]
        assert len(err) == 1 and re.search(message, err[0]), (out, err)


def test_convert_weights_full_disk_keeps_the_old_file(capsys, monkeypatch, tmp_path):
    from rest_mm.cli import convert_weights
    source, dst = tmp_path / 'authors.pth', tmp_path / 'converted.pth'
    torch.save({'model': ResT(arch='lite').state_dict()}, source)
    dst.write_bytes(b'previous conversion')

    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b'half')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, 'save', full_disk)
    line = _refusal(capsys, convert_weights.main, [str(source), str(dst)])
    assert line.startswith(f'tools/convert_weights.py: error: cannot save the converted '
                           f'checkpoint to {dst}: {os.strerror(errno.ENOSPC)}')
    assert dst.read_bytes() == b'previous conversion'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['authors.pth', 'converted.pth']


@pytest.mark.slow
@needs_full_stack
@pytest.mark.parametrize('option, new_key, message', [
    ('model.backbone.arch=smal', False, "ResT: unknown arch 'smal'; choose one of"),
    ('model.backbone.out_indices=[1,2,4]', False, 'out_indices (1, 2, 4) must be stage'),
    ('model.backbone.frozen_stages=5', True, 'frozen_stages must be in -1..4, got 5'),
    ('model.backbone.mlp_ratio=0', True, "unexpected keyword argument 'mlp_ratio'"),
])
def test_train_refuses_bad_backbone_arguments_in_one_line(tmp_path, toy_root, option, new_key,
                                                          message):
    # a subprocess each: mmengine's visualizer and loggers outlive a Runner in its process
    argv = [TOY_CONFIG, '--work-dir', str(tmp_path / 'work'), '--cfg-options', option,
            *data_roots(toy_root, 'mmdet')]
    if new_key:  # a key the config does not have: said to be new on purpose
        argv += ['--cfg-new-keys', option.split('=')[0]]
    line = _refused_run('train', argv)
    assert line.startswith('tools/train.py: error: ') and message in line, line


@pytest.mark.slow
@needs_full_stack
def test_train_refuses_a_missing_pretrained_checkpoint_in_one_line(tmp_path, toy_root):
    missing = tmp_path / 'rest_small.pth'
    config = tmp_path / 'pretrained.py'
    config.write_text(f"_base_ = [{TOY_CONFIG!r}]\n"
                      f"model = dict(backbone=dict(init_cfg=dict(_delete_=True, "
                      f"type='Pretrained', checkpoint={str(missing)!r})))\n")
    line = _refused_run('train', [config, '--work-dir', tmp_path / 'work', '--cfg-options',
                                  *data_roots(toy_root, 'mmdet')])
    assert line.startswith(f"tools/train.py: error: checkpoint '{missing}' does not exist")
