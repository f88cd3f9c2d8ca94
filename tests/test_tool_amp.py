"""``--amp`` on a CPU through tools/train.py, tools/test.py and tools/demo.py (end to end on
the toy RetinaNet): the model really computes in bfloat16, the loss is finite, checkpoints
save and resume, and test and demo give results."""
import pytest
import torch

import rest_mm.rest
from rest_mm.cli import demo as demo_tool
from rest_mm.cli import runner_setup
from rest_mm.cli import test as test_tool
from rest_mm.cli import train as train_tool

from testlib import REPO, fresh_toy_data, needs_full_stack, toy_options, write_image

pytestmark = needs_full_stack

TOY = str(REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py')


@pytest.fixture
def recorded(monkeypatch):
    """The dtypes ResT's MLPs compute in (``mlp``; at each training step, those since the
    last: ``trained_in``) and the losses our CPU optim wrapper steps on."""
    record = dict(mlp=[], loss=[], trained_in=[])
    mlp_forward = rest_mm.rest.Mlp.forward
    update_params = runner_setup.CPUAmpOptimWrapper.update_params

    def recording_mlp(self, x):
        out = mlp_forward(self, x)
        record['mlp'].append(out.dtype)
        return out

    def recording_update(self, loss, **kwargs):
        record['loss'].append(loss.item())
        record['trained_in'].append(set(record['mlp']))
        record['mlp'].clear()
        return update_params(self, loss, **kwargs)

    monkeypatch.setattr(rest_mm.rest.Mlp, 'forward', recording_mlp)
    monkeypatch.setattr(runner_setup.CPUAmpOptimWrapper, 'update_params', recording_update)
    return record


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason='--amp on a CPU')
def test_amp_on_cpu_trains_resumes_tests_and_demos_in_bfloat16(tmp_path, recorded, capsys):
    data = fresh_toy_data(tmp_path)
    small = '(64,48)'  # the data's own size: seconds per iteration
    options = toy_options(data, 'mmdet') + [
        f'train_dataloader.dataset.pipeline.2.scale={small}',
        f'test_dataloader.dataset.pipeline.1.scale={small}']
    # no validation (mmengine's train loop runs it in float32, as with CUDA's --amp)
    training = ['train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=1',
                'default_hooks.logger.interval=1']
    work = tmp_path / 'work'
    train_tool.main([TOY, '--amp', '--work-dir', str(work)] + options + training
                    + ['train_cfg.max_epochs=1'])
    assert recorded['loss'] and all(map(torch.isfinite, torch.tensor(recorded['loss'])))
    assert all(dtypes == {torch.bfloat16} for dtypes in recorded['trained_in'])
    first = torch.load(work / 'epoch_1.pth', map_location='cpu', weights_only=False)
    assert all(v.dtype != torch.bfloat16 for v in first['state_dict'].values())
    assert first['optimizer']['state']  # the optimizer's state, saved for resuming

    steps = len(recorded['loss'])
    train_tool.main([TOY, '--amp', '--work-dir', str(work), '--resume'] + options + training
                    + ['train_cfg.max_epochs=2'])
    assert len(recorded['loss']) == 2 * steps  # one more epoch, not two: resumed
    resumed = torch.load(work / 'epoch_2.pth', map_location='cpu', weights_only=False)
    assert resumed['meta']['epoch'] == 2

    recorded['mlp'].clear()
    # two steps of training score nothing above the usual threshold: keep every detection
    metrics = test_tool.main([TOY, str(work / 'epoch_2.pth'), '--amp',
                              '--work-dir', str(tmp_path / 'test')] + options
                             + ['model.test_cfg.score_thr=0.0'])
    assert set(recorded['mlp']) == {torch.bfloat16}
    assert 0 <= metrics['coco/bbox_mAP'] <= 1

    recorded['mlp'].clear()
    image = tmp_path / 'photo.png'
    write_image(image, 48, 64)
    demo_tool.main([str(image), TOY, str(work / 'epoch_2.pth'), '--amp', '--device', 'cpu',
                    '--out-dir', str(tmp_path / 'drawn'), '--score-thr', '0'])
    assert set(recorded['mlp']) == {torch.bfloat16}
    printed = capsys.readouterr().out
    assert '--amp: the network runs in torch.bfloat16 autocast on cpu' in printed
    assert 'bfloat16 on the CPU: ' in printed  # native or not, and slow where not
    assert 'photo.png: ' in printed and (tmp_path / 'drawn' / 'photo.png').is_file()
