"""The authors' mmseg 0.x UperNet checkpoints, converted for mmseg 1.x.

A synthetic checkpoint in the exact mmseg 0.x layout (random weights; the backbone keys of
the authors' ResTV2, listed in tests/data/reference/reference_checkpoint_keys.json, plus
their output norms ``norm_1..4``; the keys mmseg 0.x's UPerHead and FCNHead write, built
here from their structure; ``meta`` with ``CLASSES`` and ``PALETTE`` as mmseg 0.x writes
it) converts, loads strictly into the model of our config, and computes what a plain
reference computes from the original weights: the authors' backbone as
rest_mm/testing/straightforward.py writes it op by op, and UperNet's heads written out below
from mmseg 0.x's definitions. A slow test runs the converted file through
tools/convert_weights.py and tools/test.py (single-scale and --tta) on toy ADE data.
"""
import json
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm

from rest_mm.testing import straightforward
from rest_mm.weights import convert_released
from rest_mm.weights.mmseg0x import convert_mmseg0x_segmentor, is_mmseg0x_segmentor

from testlib import REPO, needs_full_stack

pytestmark = needs_full_stack

CONFIG = 'configs/segmentation/upernet_restv2_tiny_ade20k.py'
IN_CHANNELS = (96, 192, 384, 768)
CHANNELS, AUX_CHANNELS, POOL_SCALES = 512, 256, (1, 2, 3, 6)  # _base_/models/upernet_restv2.py
BN_EPS = 1e-5


def _conv_module(prefix: str, cin: int, cout: int, kernel: int) -> dict:
    """mmcv's ConvModule with a BN: ``conv`` (no bias) and ``bn`` with its buffers."""
    return {f'{prefix}.conv.weight': (cout, cin, kernel, kernel),
            **{f'{prefix}.bn.{name}': (cout, ) for name in
               ('weight', 'bias', 'running_mean', 'running_var')},
            f'{prefix}.bn.num_batches_tracked': ()}


def mmseg0x_head_shapes(num_classes: int) -> dict:
    """Every key (and shape) of mmseg 0.x's UPerHead and FCNHead as the authors configure
    them."""
    shapes = {'decode_head.conv_seg.weight': (num_classes, CHANNELS, 1, 1),
              'decode_head.conv_seg.bias': (num_classes, )}
    for i, _ in enumerate(POOL_SCALES):  # PPM: Sequential(AdaptiveAvgPool2d, ConvModule)
        shapes.update(_conv_module(f'decode_head.psp_modules.{i}.1', IN_CHANNELS[-1], CHANNELS, 1))
    shapes.update(_conv_module('decode_head.bottleneck',
                               IN_CHANNELS[-1] + len(POOL_SCALES) * CHANNELS, CHANNELS, 3))
    for i, cin in enumerate(IN_CHANNELS[:-1]):
        shapes.update(_conv_module(f'decode_head.lateral_convs.{i}', cin, CHANNELS, 1))
        shapes.update(_conv_module(f'decode_head.fpn_convs.{i}', CHANNELS, CHANNELS, 3))
    shapes.update(_conv_module('decode_head.fpn_bottleneck', len(IN_CHANNELS) * CHANNELS,
                               CHANNELS, 3))
    shapes.update({'auxiliary_head.conv_seg.weight': (num_classes, AUX_CHANNELS, 1, 1),
                   'auxiliary_head.conv_seg.bias': (num_classes, )})
    shapes.update(_conv_module('auxiliary_head.convs.0', IN_CHANNELS[2], AUX_CHANNELS, 3))
    return shapes


def authors_backbone_shapes(reference_dir: Path, arch: str = 'restv2_tiny') -> dict:
    """The authors' mmseg 0.x ResTV2 keys: the ImageNet model's without its classifier
    (``head``, ``norm``) and with the channels-first output norms ``norm_1..4``."""
    keys = json.loads((reference_dir / 'reference_checkpoint_keys.json').read_text())[arch]
    shapes = {k: tuple(v) for k, v in keys.items() if not k.startswith(('head.', 'norm.'))}
    for i, dim in enumerate(IN_CHANNELS):
        shapes.update({f'norm_{i + 1}.weight': (dim, ), f'norm_{i + 1}.bias': (dim, )})
    return shapes


def _random(key: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    if key.endswith('num_batches_tracked'):
        return torch.tensor(160000)
    if key.endswith('running_var'):
        return torch.rand(shape, generator=generator) + 0.5
    return torch.randn(shape, generator=generator) * 0.1


def mmseg0x_checkpoint(reference_dir: Path, num_classes: int = 150, seed: int = 0) -> dict:
    """A file as mmseg 0.x's IterBasedRunner saves the authors' UperNet ResTv2-T."""
    from mmseg.datasets import ADE20KDataset
    generator = torch.Generator().manual_seed(seed)
    state_dict = OrderedDict()
    for key, shape in authors_backbone_shapes(reference_dir).items():
        state_dict[f'backbone.{key}'] = _random(key, shape, generator)
    for key, shape in mmseg0x_head_shapes(num_classes).items():
        state_dict[key] = _random(key, shape, generator)
    classes = ADE20KDataset.METAINFO['classes'][:num_classes]
    palette = ADE20KDataset.METAINFO['palette'][:num_classes]
    meta = dict(mmseg_version='0.20.2+unknown', config='norm_cfg = dict(type=\'SyncBN\')\n...',
                CLASSES=tuple(classes), PALETTE=[list(c) for c in palette],
                env_info='sys.platform: linux', seed=0,
                exp_name='upernet_restv2_tiny_512_160k_ade20k.py', mmcv_version='1.4.0',
                time='Thu Apr 14 10:00:00 2022', epoch=1, iter=160000)
    optimizer = dict(state={}, param_groups=[dict(lr=0.0, betas=(0.9, 0.999), eps=1e-8,
                                                  weight_decay=0.01, params=[0, 1])])
    return dict(meta=meta, state_dict=state_dict, optimizer=optimizer)


def build_segmentor(num_classes: int = 150):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(REPO / CONFIG)
    cfg.model.backbone.init_cfg = None
    cfg.model.decode_head.num_classes = num_classes
    cfg.model.auxiliary_head.num_classes = num_classes
    return revert_sync_batchnorm(MODELS.build(cfg.model)).eval()


# --- the reference computation -----------------------------------------------------------
def _authors_backbone(state_dict: dict) -> torch.nn.Module:
    """The authors' backbone op by op, loaded with the checkpoint's backbone weights."""
    model = straightforward.build('restv2_tiny', detection_norms=True).eval()
    weights = {re.sub(r'^norm_(\d)\.', r'norm_\1.0.', k[len('backbone.'):]): v
               for k, v in state_dict.items() if k.startswith('backbone.')}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert missing == ['norm.weight', 'norm.bias'] and not unexpected  # the classifier norm
    return model


def _conv_bn_relu(x, sd, prefix, padding):
    x = F.conv2d(x, sd[f'{prefix}.conv.weight'], padding=padding)
    x = F.batch_norm(x, sd[f'{prefix}.bn.running_mean'], sd[f'{prefix}.bn.running_var'],
                     sd[f'{prefix}.bn.weight'], sd[f'{prefix}.bn.bias'], False, 0., BN_EPS)
    return F.relu(x)


def _upsample(x, like):
    return F.interpolate(x, size=like.shape[2:], mode='bilinear', align_corners=False)


def uperhead_reference(features, sd):
    """mmseg 0.x UPerHead.forward in eval mode (dropout off), from the state dict."""
    top = features[-1]
    pooled = [_upsample(_conv_bn_relu(F.adaptive_avg_pool2d(top, scale), sd,
                                      f'decode_head.psp_modules.{i}.1', 0), top)
              for i, scale in enumerate(POOL_SCALES)]
    laterals = [_conv_bn_relu(f, sd, f'decode_head.lateral_convs.{i}', 0)
                for i, f in enumerate(features[:-1])]
    laterals.append(_conv_bn_relu(torch.cat([top] + pooled, 1), sd, 'decode_head.bottleneck', 1))
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + _upsample(laterals[i], laterals[i - 1])
    outs = [_conv_bn_relu(laterals[i], sd, f'decode_head.fpn_convs.{i}', 1)
            for i in range(len(laterals) - 1)] + [laterals[-1]]
    outs = [outs[0]] + [_upsample(o, outs[0]) for o in outs[1:]]
    fused = _conv_bn_relu(torch.cat(outs, 1), sd, 'decode_head.fpn_bottleneck', 1)
    return F.conv2d(fused, sd['decode_head.conv_seg.weight'], sd['decode_head.conv_seg.bias'])


def fcnhead_reference(features, sd):
    """mmseg 0.x FCNHead (one conv, no concat) on stage 3, eval mode."""
    x = _conv_bn_relu(features[2], sd, 'auxiliary_head.convs.0', 1)
    return F.conv2d(x, sd['auxiliary_head.conv_seg.weight'], sd['auxiliary_head.conv_seg.bias'])


# --- tests ------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def checkpoint():
    return mmseg0x_checkpoint(Path(__file__).parent / 'data' / 'reference')


def test_recognises_only_mmseg0x_segmentors(checkpoint):
    assert is_mmseg0x_segmentor(checkpoint)
    converted, _ = convert_mmseg0x_segmentor(checkpoint)
    assert not is_mmseg0x_segmentor(dict(meta={}, state_dict=converted))  # ours, converted
    backbone_only = {k[len('backbone.'):]: v for k, v in checkpoint['state_dict'].items()
                     if k.startswith('backbone.')}
    assert not is_mmseg0x_segmentor(dict(state_dict=backbone_only))
    assert not is_mmseg0x_segmentor({'model': {'backbone.bottom_up.stage1.0.norm1.weight': 0}})


def test_converts_every_key_and_loads_strictly(checkpoint):
    converted, meta = convert_mmseg0x_segmentor(checkpoint)
    model = build_segmentor()
    assert sorted(converted) == sorted(model.state_dict())
    model.load_state_dict(converted, strict=True)
    assert meta['source'] == 'mmseg0.x' and meta['backbone'] == 'restv2_tiny'
    assert meta['config'] == CONFIG and (REPO / meta['config']).is_file()
    assert (REPO / meta['authors_test_config']).is_file()
    assert meta['num_classes'] == 150 and meta['mmseg_version'] == '0.20.2+unknown'
    assert meta['dataset_meta']['classes'][:2] == ['wall', 'building']
    assert len(meta['dataset_meta']['palette']) == 150
    json.dumps(meta)  # plain data
    # Heads keep their names; the backbone's output norms are the trained norm_1..4.
    state_dict = checkpoint['state_dict']
    assert converted['decode_head.fpn_bottleneck.bn.running_var'] is \
        state_dict['decode_head.fpn_bottleneck.bn.running_var']
    for i in range(4):
        assert converted[f'backbone.norm{i}.weight'] is state_dict[f'backbone.norm_{i + 1}.weight']


def test_converted_segmentor_computes_what_the_authors_model_computes(checkpoint):
    converted, _ = convert_mmseg0x_segmentor(checkpoint)
    model = build_segmentor()
    model.load_state_dict(converted, strict=True)
    sd = checkpoint['state_dict']
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference_features = _authors_backbone(sd)(image)
        features = model.extract_feat(image)
        for ours, theirs in zip(features, reference_features):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        logits = model.decode_head(features)
        aux_logits = model.auxiliary_head(features)
        expected = uperhead_reference(reference_features, sd)
        expected_aux = fcnhead_reference(reference_features, sd)
    assert logits.shape == (1, 150, 16, 24)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux_logits, expected_aux, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('key', ['decode_head.conv_cat.conv.weight', 'auxiliary_head.extra',
                                 'backbone.head.weight', 'backbone.norm.weight',
                                 'backbone.stage1.0.attn.extra.weight', 'neck.conv.weight'])
def test_unexplained_keys_are_errors_that_name_them(checkpoint, key):
    state_dict = dict(checkpoint['state_dict'], **{key: torch.zeros(3)})
    with pytest.raises(ValueError, match=re.escape(key)):
        convert_mmseg0x_segmentor(dict(checkpoint, state_dict=state_dict))


def test_missing_backbone_keys_are_errors(checkpoint):
    state_dict = {k: v for k, v in checkpoint['state_dict'].items()
                  if not k.startswith('backbone.norm_3.')}
    with pytest.raises(ValueError, match=r'backbone\.norm2\.weight'):
        convert_mmseg0x_segmentor(dict(checkpoint, state_dict=state_dict))


@pytest.mark.slow
def test_convert_then_test_on_toy_data_single_scale_and_tta(tmp_path):
    from rest_mm.cli.toy_data import ToyDataSpec, generate_toy_datasets
    spec = ToyDataSpec(num_train=1, num_val=3, height=64, width=80, min_size=16, max_size=40,
                       max_objects=2, seed=2)
    generate_toy_datasets(str(tmp_path / 'data'), spec)
    source = tmp_path / 'upernet_restv2_tiny_mmseg0x.pth'
    torch.save(mmseg0x_checkpoint(Path(__file__).parent / 'data' / 'reference', num_classes=4),
               source)
    converted = tmp_path / 'upernet_restv2_tiny_mmseg1x.pth'

    def run(*args):
        result = subprocess.run([sys.executable, *map(str, args)], capture_output=True,
                                text=True, cwd=REPO, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return result.stdout

    printed = run('tools/convert_weights.py', source, converted)
    assert CONFIG in printed
    saved = torch.load(converted, weights_only=False)
    assert saved['meta']['source'] == 'mmseg0.x'
    ade = tmp_path / 'data' / 'toy_ade'
    options = [f'{loader}.dataset.data_root={ade}/'
               for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    for extra in ([], ['--tta']):
        work_dir = tmp_path / f'work{"_tta" if extra else ""}'
        run('tools/test.py', 'configs/toy/upernet_restv2_tiny_toy.py', converted,
            '--work-dir', work_dir, *extra, '--cfg-options', *options)
        metrics = json.loads(sorted(work_dir.glob('*/*.json'))[-1].read_text().splitlines()[-1])
        assert 0 <= metrics['mIoU'] <= 100
        tested = Config.fromfile(work_dir / 'upernet_restv2_tiny_toy.py')
        assert tested.model.type == ('SegTTAModel' if extra else 'EncoderDecoder')


def test_convert_released_recognises_an_mmseg0x_segmentor(checkpoint):
    weights, meta = convert_released(checkpoint)
    assert meta['kind'] == 'segmentor' and meta['config'] == CONFIG
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
