"""tools/dist_train.sh and tools/dist_test.sh (through tools/dist_launch.sh): a 2-process
gloo run on the CPU."""
import os
import socket
import sys

import pytest

from testlib import TOOLS_DIR, data_options, latest_metrics, needs_full_stack, run

pytestmark = [pytest.mark.slow, needs_full_stack]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_and_testing(tmp_path, toy_root):  # noqa: F811 (fixture)
    config = 'configs/toy/upernet_restv2_tiny_toy.py'
    options = data_options(toy_root, 'mmseg') + [
        'train_cfg.max_iters=4', 'train_cfg.val_interval=4', 'param_scheduler.0.end=2',
        'param_scheduler.1.begin=2', 'param_scheduler.1.end=4',
        'default_hooks.checkpoint.interval=4', 'train_dataloader.batch_size=2',
        'default_hooks.logger.interval=1']
    env = dict(os.environ, PORT=str(_free_port()), PYTHON=sys.executable, OMP_NUM_THREADS='1')
    work_dir = tmp_path / 'work'
    result = run(['bash', TOOLS_DIR / 'dist_train.sh', config, 2, '--work-dir', work_dir,
                  '--cfg-options', *options], env=env)
    log = result.stdout + result.stderr
    assert 'Distributed launcher: pytorch' in log and 'Distributed training: True' in log
    assert 'GPU number: 2' in log  # mmengine's name for the world size
    assert 'Iter(train) [4/4]' in log
    checkpoint = work_dir / 'iter_4.pth'
    assert checkpoint.is_file()

    env['PORT'] = str(_free_port())
    result = run(['bash', TOOLS_DIR / 'dist_test.sh', config, checkpoint, 2, '--work-dir',
                  tmp_path / 'test', '--cfg-options', *options], env=env)
    assert 'mIoU' in latest_metrics(tmp_path / 'test')
