"""The shipped detection and segmentation configs. Every config loads, builds through its
library's registry, trains one step with its own optimizer (the loss goes down on a repeated
batch, the backbone's norm layers get no weight decay) and predicts; the models match the
authors' published sizes (tests/test_recipes.py checks the resolved configs against the
authors' recipes); a user's own config that swaps a stock mmdet config's backbone for ResT
works through ``custom_imports``; ADE20K-sized test images are segmented whole at their
natural size; the backbone checkpoint path fails clearly when missing and loads when
present. Inputs are tiny and SyncBN becomes BN, so all of it runs on a CPU. The published
and counted sizes are read from the model index (configs/*/metafile.yml).
"""
import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import rest_mm  # noqa: F401  (the configs import it too, through custom_imports)
from rest_mm.cli import model_index

from testlib import CONFIG_DIR, needs_full_stack

pytestmark = needs_full_stack

# The model index (configs/*/metafile.yml) holds every config's parameter count, ours and,
# where there is one, the authors' published one (COCO 80 classes, ADE20K 150; the UperNet
# counts include the auxiliary FCN head).
MODELS = {m['Config'][len('configs/'):]: m for m in model_index.models()}
PUBLISHED_PARAMS = {name: model_index.parameters(m, published=True) for name, m in MODELS.items()}
CONFIGS = sorted(PUBLISHED_PARAMS)
NORM_TYPES = (nn.LayerNorm, _BatchNorm, nn.GroupNorm)


def load_config(name: str, pretrained: bool = False) -> Config:
    cfg = Config.fromfile(CONFIG_DIR / name)
    if not pretrained:
        cfg.model.backbone.init_cfg = None
    return cfg


def build_model(cfg: Config, device=None) -> nn.Module:
    """Build through the config's library registry, with SyncBN turned into BN."""
    scope = cfg.default_scope
    models = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope), torch.device(device or 'cpu'):
        model = models.build(cfg.model)
    return model if device == 'meta' else revert_sync_batchnorm(model)


def detection_batch(with_mask: bool) -> dict:
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(batch_size=2, image_shapes=[(3, 64, 96), (3, 50, 70)],
                          num_items=[3, 2], num_classes=80, with_mask=with_mask)


def segmentation_batch(shapes, num_classes: int = 150) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    inputs, samples = [], []
    for h, w in shapes:
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, h, w)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def seeded_loss(model: nn.Module, data: dict) -> torch.Tensor:
    """The loss with the same random draws (drop path, dropout, samplers) every call."""
    torch.manual_seed(0)
    np.random.seed(0)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    return loss


def assert_no_decay_on_norm_layers(model: nn.Module, optim_wrapper, base_decay: float):
    """The backbone's norm layers get no weight decay, convolution and linear weights the
    recipe's. (Where the authors' rules let other norm layers decay, e.g. ResTv2's output
    norms in detectron2 or BatchNorms in mmseg 0.x, tests/test_recipes.py checks them.)"""
    decay = {id(p): group['weight_decay'] for group in optim_wrapper.param_groups
             for p in group['params']}
    for module_name, module in model.named_modules():
        is_backbone_norm = (isinstance(module, NORM_TYPES) and module_name.startswith('backbone.')
                            and not re.fullmatch(r'backbone\.(norm\d|stem\.proj\.\d)', module_name))
        for param_name, param in module.named_parameters(recurse=False):
            if is_backbone_norm:
                assert decay[id(param)] == 0., f'{module_name}.{param_name}'
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and param_name == 'weight':
                assert decay[id(param)] == base_decay, f'{module_name}.{param_name}'


def test_config_directories_hold_exactly_the_tested_configs():
    shipped = sorted(str(p.relative_to(CONFIG_DIR)) for sub in ('detection', 'segmentation')
                     for p in (CONFIG_DIR / sub).glob('*.py'))
    assert shipped == CONFIGS


@pytest.mark.parametrize('name', CONFIGS)
def test_shared_input_base_is_used_and_leaves_no_helper_key(name):
    """configs/_base_/detectron2_v1_input.py sets one helper key that the v1 detectors pop
    (mmengine refuses the keys it belongs to from a second base): the block reaches them
    whole and no resolved config keeps the key."""
    cfg = Config.fromfile(CONFIG_DIR / name)
    assert 'detectron2_v1_input' not in cfg
    if cfg.model.backbone.type != 'ResT' or not name.startswith('detection/'):
        return
    block = Config.fromfile(CONFIG_DIR / '_base_/detectron2_v1_input.py').detectron2_v1_input
    preprocessor = cfg.model.data_preprocessor
    assert {key: preprocessor[key] for key in block.data_preprocessor} == block.data_preprocessor
    loader = dict(block.load_image, backend_args=None)
    train, test = cfg.train_dataloader.dataset.pipeline, cfg.test_dataloader.dataset.pipeline
    assert train[0] == loader and block.train_resize in train
    assert test[:2] == [loader, block.test_resize] and test[-1] == block.test_pack


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_trains_a_step_and_predicts(name):
    cfg = load_config(name)
    assert cfg.custom_imports.allow_failed_imports is False
    assert cfg.custom_imports.imports[0] == 'rest_mm'  # *_align32: + rest_mm.transforms
    segmentation = cfg.default_scope == 'mmseg'
    if segmentation:
        # The training crops are padded to the preprocessor's size: 512x512 in the config,
        # the tiny batch's size here.
        cfg.model.data_preprocessor.size = (64, 96)
        batch = segmentation_batch([(64, 96), (64, 96)])
    else:
        batch = detection_batch(with_mask='mask_rcnn' in name)
    model = build_model(cfg)
    model.init_weights()
    assert type(model.backbone).__name__ == cfg.model.backbone.type

    if cfg.optim_wrapper.get('type') == 'AmpOptimWrapper':
        cfg.optim_wrapper.type = 'OptimWrapper'  # mixed precision needs a GPU
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert_no_decay_on_norm_layers(model, optim_wrapper, cfg.optim_wrapper.optimizer.weight_decay)

    model.train()
    data = model.data_preprocessor(batch, training=True)
    loss_before = seeded_loss(model, data)
    optim_wrapper.backward(loss_before)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f'parameters the loss does not reach: {no_grad[:5]}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optim_wrapper.step()
    optim_wrapper.zero_grad()
    with torch.no_grad():
        loss_after = seeded_loss(model, data)
    assert torch.isfinite(loss_before) and loss_after < loss_before

    model.eval()
    if segmentation:
        batch = segmentation_batch([(50, 70)])
    with torch.no_grad():
        predictions = model.test_step(batch)
    assert len(predictions) == len(batch['inputs'])
    for prediction, image in zip(predictions, batch['inputs']):
        if segmentation:
            assert prediction.pred_sem_seg.data.shape == (1, *image.shape[1:])
            continue
        instances = prediction.pred_instances
        assert instances.bboxes.shape == (len(instances), 4)
        assert ((instances.labels >= 0) & (instances.labels < 80)).all()
        if 'mask_rcnn' in name:
            assert instances.masks.shape == (len(instances), *prediction.ori_shape)


def _counted_millions(name: str) -> float:
    model = build_model(load_config(name), device='meta')
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize('name', [n for n in CONFIGS if PUBLISHED_PARAMS[n] is not None])
def test_published_parameter_count(name):
    millions = _counted_millions(name)
    assert abs(millions - PUBLISHED_PARAMS[name]) < 0.05, f'{millions:.3f} M'


@pytest.mark.parametrize('name', CONFIGS)
def test_metafile_parameter_count_is_the_configs(name):
    """The count the metafile (and the pages generated from it) states, to its 0.01 M."""
    millions = _counted_millions(name)
    assert abs(millions - model_index.parameters(MODELS[name])) <= 0.005, f'{millions:.3f} M'


@pytest.mark.slow
def test_whole_image_segmentation_keeps_the_natural_size():
    from mmseg.apis import inference_model, init_model
    cfg = load_config('segmentation/upernet_restv2_tiny_ade20k.py')
    model = revert_sync_batchnorm(init_model(cfg, device='cpu'))
    # mmseg crops the prediction back to the image size anyway: only the backbone's input
    # shows whether the image was padded on the way.
    seen = {}
    model.backbone.register_forward_hook(
        lambda module, args, outputs: seen.update(input=args[0].shape,
                                                  outputs=[o.shape[2:] for o in outputs]))
    image = np.random.RandomState(0).randint(0, 256, (512, 683, 3), dtype=np.uint8)
    result = inference_model(model, image)
    assert seen['input'] == (1, 3, 512, 683), 'the test image was padded or resized'
    assert seen['outputs'] == [(128, 171), (64, 86), (32, 43), (16, 22)]
    assert result.pred_sem_seg.data.shape == (1, 512, 683)
    assert result.seg_logits.data.shape == (150, 512, 683)


@pytest.mark.slow
def test_custom_imports_in_a_users_config_on_a_stock_mmdet_config(tmp_path):
    config = tmp_path / 'my_retinanet.py'
    config.write_text(textwrap.dedent("""
        _base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']
        custom_imports = dict(imports=['rest_mm'], allow_failed_imports=False)
        model = dict(
            backbone=dict(_delete_=True, type='ResT', arch='small'),
            neck=dict(in_channels=[64, 128, 256, 512]))
    """))
    script = textwrap.dedent(f"""
        import sys, torch
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmdet.registry import MODELS
        from mmdet.testing import demo_mm_inputs
        assert 'rest_mm' not in sys.modules
        cfg = Config.fromfile({str(config)!r})
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model)
        model.init_weights()
        batch = demo_mm_inputs(1, [(3, 64, 96)], num_items=[2], num_classes=80)
        losses = model(**model.data_preprocessor(batch, True), mode='loss')
        loss, _ = model.parse_losses(losses)
        loss.backward()
        model.eval()
        with torch.no_grad():
            prediction, = model.test_step(batch)
        print(type(model.backbone).__name__, model.backbone.arch['depths'],
              bool(torch.isfinite(loss)), prediction.pred_instances.bboxes.shape[1])
    """)
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'ResT (2, 2, 6, 2) True 4' in result.stdout


@pytest.mark.parametrize('name', ['detection/retinanet_rest_small_coco.py',
                                  'segmentation/upernet_restv2_tiny_ade20k.py'])
def test_backbone_checkpoint_path_missing_fails_clearly_then_loads(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative placeholder path cannot exist here
    cfg = load_config(name, pretrained=True)
    placeholder = cfg.model.backbone.init_cfg.checkpoint
    model = build_model(cfg)
    with pytest.raises(FileNotFoundError, match=f"checkpoint '{placeholder}' does not exist"):
        model.init_weights()

    # An ImageNet-style backbone (all four output norms) saved where the config looks.
    imagenet = type(model.backbone)(arch=cfg.model.backbone.arch).state_dict()
    Path(placeholder).parent.mkdir(parents=True)
    torch.save({'state_dict': imagenet}, placeholder)
    model.init_weights()
    loaded = model.backbone.state_dict()
    body = [k for k in imagenet if k.startswith(('stem.', 'stages.'))]
    assert body and all(torch.equal(loaded[k], imagenet[k]) for k in body)
