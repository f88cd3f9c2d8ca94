"""rest_mm.cli.safe_files and rest_mm.cli.checkpoint_hook: outputs written whole or not at
all, checked before the work, one training run per work dir, and checkpoints that survive
a kill or a full disk while they are saved (mmengine alone, no mmdet/mmseg needed)."""
import errno
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mmengine.config import Config

from rest_mm.cli import safe_files
from rest_mm.cli.checkpoint_hook import use_atomic_checkpoints
from rest_mm.cli.safe_files import (
    LOCK_NAME,
    OutputError,
    WorkDirBusy,
    atomic_open,
    atomic_output,
    check_output_path,
    lock_work_dir,
)
from rest_mm.weights.files import read_local_checkpoint

from testlib import REPO, work_dir_held_by_another_process


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if safe_files.TEMPORARY_MARK in p.name)


# ---------------------------------------------------------------------------------------
# atomic_output / atomic_open
# ---------------------------------------------------------------------------------------
def test_atomic_output_replaces_the_file_whole(tmp_path):
    target = tmp_path / 'sub' / 'out.json'
    with atomic_open(str(target)) as file:
        json.dump({'a': 1}, file)
        assert not target.exists()  # nothing at the final name before the end
    assert json.loads(target.read_text()) == {'a': 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    with atomic_output(str(target)) as temporary:
        assert Path(temporary).parent == target.parent and temporary.endswith('.json')
        Path(temporary).write_text('{"a": 2}')
    assert json.loads(target.read_text()) == {'a': 2}
    assert _leftovers(target.parent) == []


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / 'model.onnx'
    target.write_bytes(b'previous')
    with pytest.raises(RuntimeError, match='exporter failed'):
        with atomic_output(str(target)) as temporary:
            Path(temporary).write_bytes(b'half')
            raise RuntimeError('exporter failed')
    assert target.read_bytes() == b'previous' and _leftovers(tmp_path) == []


def test_a_full_disk_is_one_line_and_leaves_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / 'picture.png'
    target.write_bytes(b'previous')
    with pytest.raises(OutputError) as caught:
        with atomic_output(str(target), 'write picture') as temporary:
            with open(temporary, 'wb') as file:
                file.write(b'half')
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = str(caught.value)
    assert message == (f'cannot write picture {target}: No space left on device; free some '
                       f'space (or choose another disk) and run again'), message
    assert caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == b'previous' and _leftovers(tmp_path) == []


def test_a_symbolic_link_keeps_pointing_at_the_written_file(tmp_path):
    real = tmp_path / 'real.json'
    real.write_text('old')
    link = tmp_path / 'link.json'
    link.symlink_to(real)
    with atomic_open(str(link)) as file:
        file.write('new')
    assert link.is_symlink() and real.read_text() == 'new'


# ---------------------------------------------------------------------------------------
# check_output_path
# ---------------------------------------------------------------------------------------
def test_outputs_of_the_wrong_kind_are_refused(tmp_path):
    a_file = tmp_path / 'file.txt'
    a_file.write_text('x')
    with pytest.raises(OutputError, match=r'--out .*folder; give a file name'):
        check_output_path(str(tmp_path), 'file', option='--out')
    with pytest.raises(OutputError, match=r'--out-dir .*file.txt is a file, not a folder'):
        check_output_path(str(a_file), 'dir', option='--out-dir')
    for kind in ('file', 'dir'):  # under a file: nothing can be created there
        with pytest.raises(OutputError, match='is a file, not a folder, so nothing can be'):
            check_output_path(str(a_file / 'deeper' / 'out.pkl'), kind)
    with pytest.raises(ValueError, match="kind must be 'file' or 'dir'"):
        check_output_path(str(a_file), 'folder')


def test_read_only_outputs_are_refused(read_only_dir):
    for kind, path in (('file', read_only_dir / 'results.pkl'), ('dir', read_only_dir),
                       ('dir', read_only_dir / 'new' / 'pictures')):
        with pytest.raises(OutputError, match='is not writable .*choose a folder you can'):
            check_output_path(str(path), kind, option='--out')


def test_writable_outputs_pass_and_nothing_is_created(tmp_path):
    check_output_path(str(tmp_path / 'a' / 'b' / 'out.pkl'), 'file')
    check_output_path(str(tmp_path / 'a' / 'b'), 'dir')
    check_output_path(str(tmp_path), 'dir', needed_bytes=1)
    assert list(tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused(tmp_path):
    with pytest.raises(OutputError, match=r'MB will be written and only .* MB are free'):
        check_output_path(str(tmp_path / 'big.onnx'), 'file', needed_bytes=1 << 60)


# ---------------------------------------------------------------------------------------
# One run per work dir.
# ---------------------------------------------------------------------------------------
def test_a_live_run_holds_its_work_dir_and_a_dead_one_does_not(tmp_path):
    work_dir = tmp_path / 'work'
    with work_dir_held_by_another_process(work_dir) as holder:
        with pytest.raises(WorkDirBusy) as caught:
            lock_work_dir(str(work_dir))
    message = str(caught.value)
    assert f'pid {holder.pid} on {socket.gethostname()}' in message, message
    assert 'importlib' not in message  # the command line, not the code it ran
    assert 'python' in message and str(work_dir) in message and 'started 20' in message
    assert 'give this run another --work-dir' in message
    assert caught.value.errno == errno.EBUSY
    assert (work_dir / LOCK_NAME).exists()  # left by the killed holder: does not block
    lock = lock_work_dir(str(work_dir))
    held = json.loads((work_dir / LOCK_NAME).read_text())
    assert held['pid'] == os.getpid()
    lock.release()
    assert list(work_dir.iterdir()) == []  # the lock file is removed at a normal end
    fresh = tmp_path / 'fresh'
    lock_work_dir(str(fresh)).release()
    assert not fresh.exists()  # created for the lock only, and nothing written: removed


def test_other_ranks_do_not_take_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv('RANK', '1')
    assert lock_work_dir(str(tmp_path / 'work')) is None
    assert not (tmp_path / 'work').exists()


# ---------------------------------------------------------------------------------------
# Checkpoints: a kill or a full disk while one is saved.
# ---------------------------------------------------------------------------------------
def test_the_checkpoint_hook_is_swapped_keeping_its_options():
    cfg = Config(dict(default_hooks=dict(checkpoint=dict(
        type='CheckpointHook', interval=3, max_keep_ckpts=1, save_best='auto')),
        custom_hooks=[dict(type='mmengine.CheckpointHook', interval=5),
                      dict(type='EMAHook')]))
    use_atomic_checkpoints(cfg)
    assert cfg.default_hooks.checkpoint == dict(type='AtomicCheckpointHook', interval=3,
                                                max_keep_ckpts=1, save_best='auto')
    assert [h['type'] for h in cfg.custom_hooks] == ['AtomicCheckpointHook', 'EMAHook']
    bare = use_atomic_checkpoints(Config(dict()))  # mmengine would add CheckpointHook
    assert bare.default_hooks.checkpoint == dict(type='AtomicCheckpointHook', interval=1)
    off = use_atomic_checkpoints(Config(dict(default_hooks=dict(checkpoint=None))))
    assert off.default_hooks.checkpoint is None


# A two-epoch mmengine run of a one-layer model, keeping one checkpoint, whose checkpoint
# write number FAIL_AT writes half its bytes and then dies (kill: os._exit, no clean-up)
# or raises ENOSPC (full disk). Run as a subprocess: a kill must leave what a kill leaves.
_RUN = textwrap.dedent("""
    import errno, os, sys
    import torch
    from torch import nn
    from mmengine.fileio import LocalBackend
    from mmengine.model import BaseModel
    from mmengine.runner import Runner, find_latest_checkpoint
    import rest_mm.cli.checkpoint_hook  # registers AtomicCheckpointHook
    from rest_mm.weights.files import allow_mmengine_checkpoints

    work_dir, hook, failure, fail_at, resume = sys.argv[1:6]
    allow_mmengine_checkpoints()
    real_put, saves = LocalBackend.put, []

    def put(self, obj, filepath):
        if 'epoch_' in os.path.basename(filepath):  # a checkpoint, by any name
            saves.append(filepath)
            if len(saves) == int(fail_at):
                with open(filepath, 'wb') as file:
                    file.write(obj[:len(obj) // 2])
                if failure == 'kill':
                    os._exit(9)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_put(self, obj, filepath)

    LocalBackend.put = put

    class Tiny(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, inputs, labels=None, mode='tensor'):
            out = self.linear(torch.stack(inputs)).squeeze(1)
            return dict(loss=((out - torch.stack(labels)) ** 2).mean()) if mode == 'loss' else out

    data = [dict(inputs=torch.tensor([float(i), 1.]), labels=torch.tensor(float(i % 3)))
            for i in range(4)]
    runner = Runner(
        model=Tiny(), work_dir=work_dir, default_scope='mmengine',
        train_dataloader=dict(dataset=data, batch_size=2, collate_fn=dict(type='pseudo_collate'),
                              sampler=dict(type='DefaultSampler', shuffle=False)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=2),
        default_hooks=dict(checkpoint=dict(type=hook, interval=1, max_keep_ckpts=1),
                           logger=dict(type='LoggerHook', interval=1)),
        resume=resume == 'resume',
        load_from=find_latest_checkpoint(work_dir) if resume == 'resume' else None)
    try:
        runner.train()
    except OSError as error:
        print('ERROR:', error)
        sys.exit(2)
""")


def _train(work_dir: Path, hook: str, failure: str = 'none', fail_at: int = 0,
           resume: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-c', _RUN, str(work_dir), hook, failure, str(fail_at),
         'resume' if resume else 'fresh'], capture_output=True, text=True, timeout=300,
        env={**os.environ, 'PYTHONPATH': str(REPO)})


def _complete_checkpoints(work_dir: Path) -> dict:
    """The checkpoints that load completely, by name, as their epoch."""
    complete = {}
    for path in work_dir.glob('*.pth'):
        try:  # our reader: mmengine's training state on every torch, CRCs checked
            complete[path.name] = read_local_checkpoint(str(path))['meta']['epoch']
        except Exception:  # truncated: what must not be there
            pass
    return complete


@pytest.mark.slow
@pytest.mark.parametrize('failure', ['kill', 'enospc'])
def test_a_failed_save_keeps_the_previous_checkpoint_and_resume_takes_it(tmp_path, failure):
    # mmengine's own hook first: the same failure leaves nothing to resume from (the defect)
    theirs = tmp_path / 'mmengine'
    _train(theirs, 'CheckpointHook', failure, fail_at=2)
    assert _complete_checkpoints(theirs) == {}

    work_dir = tmp_path / 'ours'
    result = _train(work_dir, 'AtomicCheckpointHook', failure, fail_at=2)
    if failure == 'kill':
        assert result.returncode == 9, result.stderr[-3000:]
    else:  # one line naming the file, the cause and that the previous one is intact
        assert result.returncode == 2, result.stderr[-3000:]
        line = result.stdout.strip().splitlines()[-1]
        assert line.startswith(f'ERROR: cannot save checkpoint {work_dir.resolve()}/epoch_2.pth:'
                               f' No space left on device; free some space'), line
        assert 'the checkpoints saved before it are intact' in line
    assert _complete_checkpoints(work_dir) == {'epoch_1.pth': 1}
    # no half-written file that looks like a checkpoint: a kill leaves a hidden .tmp- one
    assert sorted(p.name for p in work_dir.iterdir() if p.suffix == '.pth') == ['epoch_1.pth']
    assert all(name.startswith('.') for name in _leftovers(work_dir))
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / 'epoch_1.pth')
    if failure == 'enospc':  # cleaned up at once
        assert _leftovers(work_dir) == []

    resumed = _train(work_dir, 'AtomicCheckpointHook', resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert 'resumed epoch: 1, iter: 2' in log, log[-3000:]
    assert _complete_checkpoints(work_dir) == {'epoch_2.pth': 2}  # max_keep_ckpts=1 holds
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / 'epoch_2.pth')
    assert _leftovers(work_dir) == []  # a killed save's temporary file is cleared at start


class _Runner:
    """What CheckpointHook uses of mmengine's Runner; its save writes in two parts, and
    notes which checkpoints existed when it began."""

    def __init__(self, work_dir: Path):
        from mmengine.logging import MessageHub, MMLogger
        self.work_dir, self.epoch, self.iter = str(work_dir), 0, 0
        self.message_hub = MessageHub(f'safe_files_{id(self)}')
        self.logger = MMLogger.get_instance('safe_files_test')
        self.full_disk, self.present_at_saves = False, []

    def save_checkpoint(self, out_dir, filename, *args, **kwargs):
        self.present_at_saves.append(sorted(p.name for p in Path(self.work_dir).glob('*.pth')))
        with open(os.path.join(out_dir, filename), 'wb') as file:
            file.write(b'first half')
            if self.full_disk:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            file.write(b', second half')


def test_the_previous_best_checkpoint_is_removed_only_after_the_new_one_is_complete(
        tmp_path):
    from rest_mm.cli.checkpoint_hook import AtomicCheckpointHook
    hook = AtomicCheckpointHook(interval=1, save_best='acc', rule='greater')
    runner = _Runner(tmp_path)
    hook.before_train(runner)
    for epoch, acc in ((1, 0.5), (2, 0.6)):
        runner.epoch = epoch
        hook._save_best_checkpoint(runner, {'acc': acc})
    # mmengine's own hook removed best_acc_epoch_1.pth before writing its successor
    assert runner.present_at_saves == [[], ['best_acc_epoch_1.pth']]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['best_acc_epoch_2.pth']
    runner.epoch, runner.full_disk = 3, True
    with pytest.raises(OutputError, match='cannot save checkpoint .*best_acc_epoch_3.pth: No '
                       'space left on device.* the checkpoints saved before it are intact'):
        hook._save_best_checkpoint(runner, {'acc': 0.7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ['best_acc_epoch_2.pth']
    assert (tmp_path / 'best_acc_epoch_2.pth').read_bytes() == b'first half, second half'


def test_a_process_holding_its_work_dir_may_take_it_again(tmp_path):
    """A tool run twice in one process (tests, tools/main_job.py) is one holder."""
    first = lock_work_dir(str(tmp_path / 'work'))
    assert lock_work_dir(str(tmp_path / 'work' / '.')) is first
    first.release()
    second = lock_work_dir(str(tmp_path / 'work'))
    assert second is not first
    second.release()


def test_test_tool_out_is_dumped_atomically(tmp_path, monkeypatch):
    """tools/test.py --out: mmengine's DumpResults (mmdet's DumpDetResults is one) wrapped
    by written_atomically: a complete pickle, or on a full disk the previous file."""
    import pickle

    import mmengine.evaluator.metric as metric_module
    from mmengine.evaluator import DumpResults
    out = tmp_path / 'predictions.pkl'
    metric = safe_files.written_atomically(DumpResults(out_file_path=str(out)))
    metric.compute_metrics([{'pred': 1}, {'pred': 2}])
    assert pickle.loads(out.read_bytes()) == [{'pred': 1}, {'pred': 2}]
    assert metric.out_file_path == str(out)

    def dump_half(obj, path, **kwargs):
        Path(path).write_bytes(b'half a pickle')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metric_module, 'dump', dump_half)
    with pytest.raises(OutputError, match=f'cannot write {out}: No space left on device'):
        metric.compute_metrics([{'pred': 3}])
    assert pickle.loads(out.read_bytes()) == [{'pred': 1}, {'pred': 2}]
    assert _leftovers(tmp_path) == [] and metric.out_file_path == str(out)
