"""Every tool's outputs (issue 16, "Data loss" and "work thrown away"): checked at start-up,
before the work (a read-only folder, a file where a folder is needed and the reverse), and
written whole (a full disk or a kill leaves the previous file and says so in one line); one
training run per work dir; a kill while the toy training saves its only checkpoint leaves one
that ``--resume`` takes."""
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rest_mm.cli import convert_weights as convert_tool
from rest_mm.cli import export_onnx as export_tool
from rest_mm.cli import visualize as visualize_tool
from rest_mm.cli.safe_files import TEMPORARY_MARK

from testlib import (
    REPO,
    TOOLS_DIR,
    TRAINING_TIMEOUT,
    data_options,
    fresh_toy_data,
    needs_full_stack,
    reference_config,
    run,
    toy_options,
    work_dir_held_by_another_process,
    write_image,
)

TOY_CONFIG = str(REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py')
NO_SPACE = 'No space left on device; free some space'


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _work_must_not_start(*args, **kwargs):
    raise AssertionError('the work started before the outputs were checked')


def _wrong_outputs(tmp_path: Path, read_only_dir: Path, name: str) -> list:
    """``(path, message)`` for a file output that cannot be written."""
    folder = tmp_path / f'a_folder_{name}'
    folder.mkdir()
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    return [(read_only_dir / name, 'is not writable'), (folder, 'is a folder; give a file'),
            (a_file / name, 'is a file, not a folder')]


def _hidden_leftovers(folder: Path) -> list:
    return [p.name for p in folder.iterdir() if TEMPORARY_MARK in p.name]


# ---------------------------------------------------------------------------------------
# export_onnx, visualize, convert_weights: library tools.
# ---------------------------------------------------------------------------------------
def test_export_onnx_full_disk_or_kill_leaves_the_previous_file(tmp_path, monkeypatch,
                                                               reference_arch):
    config = str(reference_config(tmp_path, 'v2', reference_arch))
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'previous export')
    written = []

    def export_half(model, output_names, out_file, failure):
        written.append(out_file)
        Path(out_file).write_bytes(b'half an ONNX file')
        raise failure

    monkeypatch.setattr(export_tool, 'export',
                        lambda *a: export_half(*a, OSError(errno.ENOSPC, 'No space left on '
                                                           'device')))
    with pytest.raises(SystemExit) as caught:
        export_tool.main([config, '--out', str(out)])
    assert caught.value.code == 2
    assert str(caught.value) == f'tools/export_onnx.py: error: cannot export ONNX to {out}: ' \
                                f'{NO_SPACE} (or choose another disk) and run again'
    # a kill: nothing catches it; the file being written was never --out
    monkeypatch.setattr(export_tool, 'export', lambda *a: export_half(*a, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_tool.main([config, '--out', str(out)])
    assert out.read_bytes() == b'previous export'
    assert str(out) not in written and _hidden_leftovers(tmp_path) == []


def test_export_onnx_checks_its_output_before_exporting(tmp_path, read_only_dir, monkeypatch):
    monkeypatch.setattr(export_tool, 'export', _work_must_not_start)
    for out, message in _wrong_outputs(tmp_path, read_only_dir, 'model.onnx'):
        with pytest.raises(SystemExit, match=message):
            export_tool.main(['rest_small', '--out', str(out)])


def test_visualize_checks_its_output_before_the_work(tmp_path, read_only_dir, monkeypatch):
    image = tmp_path / 'photo.png'
    write_image(image, 20, 30)
    monkeypatch.setattr(visualize_tool, 'build_standalone_backbone', _work_must_not_start)
    for out, message in _wrong_outputs(tmp_path, read_only_dir, 'maps.png'):
        with pytest.raises(SystemExit, match=message):
            visualize_tool.main([str(image), 'rest_small', '--out', str(out)])


def test_visualize_on_a_full_disk_leaves_no_partial_picture(tmp_path, monkeypatch,
                                                            reference_arch):
    import matplotlib.figure
    image = tmp_path / 'photo.png'
    write_image(image, 40, 56)
    out = tmp_path / 'out' / 'maps.png'

    def save_half(figure, path, **kwargs):
        Path(path).write_bytes(b'\x89PNG half')
        _full_disk()

    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', save_half)
    config = str(reference_config(tmp_path, 'v2', reference_arch))
    with pytest.raises(SystemExit, match=f'^tools/visualize.py: error: cannot write {out}: '
                                         f'{NO_SPACE}'):
        visualize_tool.main([str(image), config, '--out', str(out)])
    assert list(out.parent.iterdir()) == []


def test_convert_weights_on_a_full_disk_is_one_line_and_keeps_dst(tmp_path, monkeypatch):
    source = tmp_path / 'authors.pth'
    torch.save({'state_dict': {'stem.conv1.weight': torch.ones(2, 3, 3, 3)}}, source)
    dst = tmp_path / 'converted.pth'
    dst.write_bytes(b'previous conversion')
    monkeypatch.setattr(convert_tool, 'convert_released',
                        lambda checkpoint: ({'backbone.w': torch.ones(2)}, {'kind': 'backbone'}))
    real_save = torch.save

    def save_half(obj, path, *args, **kwargs):
        real_save({'half': True}, path)
        _full_disk()

    monkeypatch.setattr(torch, 'save', save_half)
    with pytest.raises(SystemExit) as caught:
        convert_tool.main([str(source), str(dst)])
    assert caught.value.code == 2
    assert str(caught.value).startswith(f'tools/convert_weights.py: error: cannot save the '
                                        f'converted checkpoint to {dst}: {NO_SPACE}')
    assert dst.read_bytes() == b'previous conversion' and _hidden_leftovers(tmp_path) == []


def test_benchmark_checks_its_plot_before_timing(tmp_path, read_only_dir, capsys):
    from rest_mm.cli import benchmark
    for out, message in _wrong_outputs(tmp_path, read_only_dir, 'latency.png'):
        with pytest.raises(SystemExit):  # parse_args: nothing has been timed yet
            benchmark.parse_args(['rest_small', '--plot', str(out)])
        assert message in capsys.readouterr().err


def test_benchmark_plot_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    import matplotlib.figure

    from rest_mm.cli import benchmark
    out = tmp_path / 'latency.png'
    out.write_bytes(b'previous plot')

    def save_half(figure, path, **kwargs):
        Path(path).write_bytes(b'\x89PNG half')
        _full_disk()

    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', save_half)
    with pytest.raises(OSError, match=f'^cannot write {out}: {NO_SPACE}'):
        benchmark.plot({(64, 64): {'rest_small': 0.1}}, str(out), 'forward')
    assert out.read_bytes() == b'previous plot' and _hidden_leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------
# The OpenMMLab tools (the pinned stack).
# ---------------------------------------------------------------------------------------
@needs_full_stack
def test_test_tool_checks_out_before_the_evaluation(tmp_path, read_only_dir, monkeypatch):
    from rest_mm.cli import test as test_tool
    data = fresh_toy_data(tmp_path)
    checkpoint = tmp_path / 'trained.pth'
    checkpoint.write_bytes(b'read only after the outputs are checked')
    monkeypatch.setattr(test_tool, 'read_checkpoint', _work_must_not_start)
    # a read-only folder, and a folder where the file goes (the reverse: the work dir below)
    for out, message in _wrong_outputs(tmp_path, read_only_dir, 'predictions.pkl')[:2]:
        with pytest.raises(SystemExit, match=f'--out .*{message}'):
            test_tool.main([TOY_CONFIG, str(checkpoint), '--out', str(out), '--work-dir',
                            str(tmp_path / 'work')] + toy_options(data, 'mmdet'))
    a_file = tmp_path / 'a_file'
    with pytest.raises(SystemExit, match='work dir .* is a file, not a folder'):
        test_tool.main([TOY_CONFIG, str(checkpoint), '--work-dir', str(a_file)]
                       + toy_options(data, 'mmdet'))


@needs_full_stack
def test_demo_checks_its_folder_before_the_work(tmp_path, read_only_dir, monkeypatch):
    from rest_mm.cli import demo as demo_tool
    write_image(tmp_path / 'a.png', 16, 16)
    monkeypatch.setattr(demo_tool, 'build_inferencer', _work_must_not_start)
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    for out_dir, message in ((read_only_dir, 'is not writable'),
                             (a_file, 'is a file, not a folder')):
        with pytest.raises(SystemExit, match=f'--out-dir .*{message}'):
            demo_tool.main([str(tmp_path / 'a.png'), TOY_CONFIG, '--out-dir', str(out_dir)])


@needs_full_stack
@pytest.mark.slow
def test_demo_on_a_full_disk_stops_with_one_line_and_no_empty_picture(tmp_path):
    write_image(tmp_path / 'a.png', 32, 48)
    out_dir = tmp_path / 'out'
    # The picture's bytes never fit: LocalBackend.put (mmcv.imwrite's writer) creates the
    # file, then the disk is full.
    script = textwrap.dedent(f"""
        import errno, os, runpy, sys
        from mmengine.fileio import LocalBackend

        def put(self, obj, filepath):
            open(filepath, 'wb').close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        LocalBackend.put = put
        sys.argv = ['tools/demo.py', {str(tmp_path / 'a.png')!r}, {TOY_CONFIG!r},
                    '--out-dir', {str(out_dir)!r}, '--device', 'cpu']
        runpy.run_path({str(TOOLS_DIR / 'demo.py')!r}, run_name='__main__')
    """)
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=900)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f'tools/demo.py: error: cannot write {out_dir / "a.png"}: {NO_SPACE} (or '
                    f'choose another disk) and run again (the pictures before a.png are '
                    f'complete)'), result.stderr
    assert 'Traceback' not in result.stderr
    assert list(out_dir.iterdir()) == []  # no 0-byte picture


# ---------------------------------------------------------------------------------------
# tools/train.py: one run per work dir; a kill while the only checkpoint is replaced.
# ---------------------------------------------------------------------------------------
def _train_until_the_runner(monkeypatch, work_dir: Path) -> list:
    """tools/train.py's main up to building the Runner, which raises: the config as
    build_config gives it (stubbed: the lock and the checks come after it whatever it
    holds), no checkpoint to start from. The arguments to run it with."""
    from mmengine.config import Config

    from rest_mm.cli import train as train_tool
    monkeypatch.setattr(train_tool, 'build_config',
                        lambda args: Config(dict(work_dir=str(work_dir))))
    monkeypatch.setattr(train_tool, 'read_start_checkpoint', lambda cfg, *options: None)
    monkeypatch.setattr(train_tool.runner_setup, 'build_runner', _work_must_not_start)
    return [TOY_CONFIG, '--work-dir', str(work_dir)]


def test_a_second_training_into_a_held_work_dir_is_refused(tmp_path, monkeypatch, capsys):
    from rest_mm.cli import train as train_tool
    work_dir = tmp_path / 'work'
    argv = _train_until_the_runner(monkeypatch, work_dir)
    with work_dir_held_by_another_process(work_dir) as holder:
        with pytest.raises(SystemExit) as caught:
            train_tool.main(argv)
    assert caught.value.code == 2
    message = capsys.readouterr().err
    assert f'the work dir {work_dir} is in use by another training run (pid {holder.pid} ' \
           f'on ' in message and '--work-dir' in message, message
    # the holder is dead: its lock does not block (the run starts: Runner.from_cfg is reached)
    with pytest.raises(AssertionError, match='the work started'):
        train_tool.main(argv)


def test_training_refuses_a_work_dir_it_cannot_write(tmp_path, read_only_dir, monkeypatch,
                                                     capsys):
    from rest_mm.cli import train as train_tool
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    for work_dir, message in ((read_only_dir / 'work', 'is not writable'),
                              (a_file, 'is a file, not a folder')):
        with pytest.raises(SystemExit) as caught:
            train_tool.main(_train_until_the_runner(monkeypatch, work_dir))
        assert caught.value.code == 2 and message in capsys.readouterr().err


# The toy config keeps one checkpoint (max_keep_ckpts=1). The write of the second one dies
# half-way, as kill -9 would: mmengine's hook had already removed the first.
_KILLED_AT_SECOND_SAVE = textwrap.dedent("""
    import os, runpy, sys
    from mmengine.fileio import LocalBackend
    real_put, saves = LocalBackend.put, []

    def put(self, obj, filepath):
        if 'epoch_' in os.path.basename(filepath):
            saves.append(filepath)
            if len(saves) == 2:
                with open(filepath, 'wb') as file:
                    file.write(obj[:len(obj) // 2])
                os._exit(9)
        return real_put(self, obj, filepath)

    LocalBackend.put = put
    sys.argv = ['tools/train.py', *sys.argv[1:]]
    runpy.run_path(os.path.join('tools', 'train.py'), run_name='__main__')
""")


@needs_full_stack
@pytest.mark.slow
def test_a_kill_while_the_toy_training_saves_leaves_a_checkpoint_to_resume(tmp_path):
    from rest_mm.weights.files import allow_mmengine_checkpoints
    data = fresh_toy_data(tmp_path)
    work_dir = tmp_path / 'work'
    arguments = [TOY_CONFIG, '--work-dir', str(work_dir), '--cfg-options',
                 *data_options(data, 'mmdet'), 'train_cfg.max_epochs=2',
                 'train_cfg.val_interval=10', 'param_scheduler.1.end=2',
                 'default_hooks.checkpoint.interval=1']
    killed = subprocess.run([sys.executable, '-c', _KILLED_AT_SECOND_SAVE, *arguments],
                            capture_output=True, text=True, cwd=REPO, timeout=TRAINING_TIMEOUT)
    assert killed.returncode == 9, killed.stderr[-3000:]
    assert sorted(p.name for p in work_dir.glob('epoch_*.pth')) == ['epoch_1.pth']
    allow_mmengine_checkpoints()
    assert torch.load(work_dir / 'epoch_1.pth', weights_only=True)['meta']['epoch'] == 1
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / 'epoch_1.pth')

    resumed = run([sys.executable, TOOLS_DIR / 'train.py', *arguments, '--resume'],
                  timeout=TRAINING_TIMEOUT)
    assert 'resumed epoch: 1' in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in work_dir.glob('epoch_*.pth')) == ['epoch_2.pth']
    assert torch.load(work_dir / 'epoch_2.pth', weights_only=True)['meta']['epoch'] == 2
    assert _hidden_leftovers(work_dir) == []
