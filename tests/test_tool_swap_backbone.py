"""tools/swap_backbone.py, and ResT in mmdet's and mmseg's own configs.

The libraries' configs take ResT by hand as the README describes (the backbone replaced with
``_delete_=True``, the consumer's channels set, mmseg's ``model.pretrained=None``): each such
config builds, trains one step (the backbone's weights move, the loss is finite) and
predicts at the input's size. The tool, given the original config, writes a config whose
model resolves to exactly the hand-written one; where the hand-written adaptation is not
spelled out here, the tool's own config trains and predicts. Families that cannot take a
4-stage pyramid are refused with exit status 2 and one line, and nothing is written.
"""
import importlib.util
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from rest_mm.cli import swap_backbone
from rest_mm.cli.swap_backbone import Refused, choose_stages, map_channels

from testlib import REPO, run

needs_mmdet = pytest.mark.skipif(importlib.util.find_spec('mmdet') is None,
                                 reason='needs mmdet 3.x (the pinned stack, .venv)')
needs_mmseg = pytest.mark.skipif(importlib.util.find_spec('mmseg') is None,
                                 reason='needs mmseg 1.x (the pinned stack, .venv)')
SIZE = 64  # images of SIZE x SIZE: seconds per training step on a CPU
LITE = (64, 128, 256, 512)  # ResT-Lite's stage widths, as written by hand in the README

# ---------------------------------------------------------------------------------------
# The mechanics, without the libraries.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('value, in_index, expected', [
    ([256, 512, 1024, 2048], None, [64, 128, 256, 512]),  # FPN, MaskFormer heads
    ((256, 512, 1024, 2048), None, (64, 128, 256, 512)),  # the type is kept
    ([2048, 1024, 512, 256], None, [512, 256, 128, 64]),  # YOLOv3's neck, deepest first
    (2048, -1, 512),  # an mmseg head's map chosen by in_index
    (1024, 2, 256),
    ([512, 2048], [1, 3], [128, 512]),
    (1024, None, None),  # an int with several outputs and no in_index: unexplained
    ([256, 512, 1024], None, None),  # a prefix is no explanation
    (999, -1, None),
    ([256, 512], [0, 7], None),  # in_index out of range
])
def test_channels_are_rewritten_only_where_the_original_outputs_explain_them(
        value, in_index, expected):
    old, new = [256, 512, 1024, 2048], [64, 128, 256, 512]
    assert map_channels(value, old, new, in_index) == expected


def test_a_single_output_explains_an_int():  # DETR's, YOLOF's, CenterNet's neck
    assert map_channels(2048, [2048], [512]) == 512


@pytest.mark.parametrize('strides, allow_dilated, expected', [
    ((4, 8, 16, 32), False, ((0, 1, 2, 3), True)),
    ((8, 16, 32), False, ((1, 2, 3), True)),  # DINO, YOLOX, RTMDet, YOLOv3
    ((32, ), False, ((3, ), True)),  # DETR, YOLOF
    ((16, ), False, ((2, ), True)),  # a dilated C5 (DC5) at stride 16
    ((4, 8, 8, 8), True, ((0, 1, 2, 3), False)),  # mmseg's d8 ResNets
    ((4, 8, 16, 16), True, ((0, 1, 2, 3), False)),  # d16
])
def test_stages_are_chosen_by_stride(strides, allow_dilated, expected):
    assert choose_stages(strides, allow_dilated, 'cfg') == expected


@pytest.mark.parametrize('strides, allow_dilated', [
    ((4, 8, 8, 8), False),  # detection heads are set for the original strides
    ((4, 4), False),  # hourglass stacks (CornerNet)
    ((8, 4), True),
    ((16, 16, 16, 16), True),  # a plain ViT
    ((2, 4, 8, 16, 32), True),  # UNet
    ((4, 8, 16, 32, 64), False),
    ((32, 16), True),
])
def test_strides_no_choice_of_stages_serves_are_refused(strides, allow_dilated):
    with pytest.raises(Refused, match=r'strides .* ResT\'s stages have strides'):
        choose_stages(strides, allow_dilated, 'cfg')


def _refusal(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        swap_backbone.main(args)
    assert exit_info.value.code == 2
    # (mmengine's logger may also write here, to a stream an earlier test captured)
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith('tools/swap_backbone.py')]
    assert len(lines) == 1 and lines[0].startswith('tools/swap_backbone.py: error: '), lines
    return lines[0]


def test_bad_requests_are_refused_before_anything_is_read(tmp_path, capsys):
    config = tmp_path / 'a.py'
    config.write_text("default_scope = 'mmdet'\nmodel = dict(backbone=dict(type='ResNet'))\n")
    assert 'is the input config' in _refusal(
        capsys, [str(config), '--arch', 'rest_lite', '-o', str(config)])
    assert 'must be a .py config' in _refusal(
        capsys, [str(config), '--arch', 'rest_lite', '-o', str(tmp_path / 'b.txt')])
    assert 'no such config file' in _refusal(
        capsys, [str(tmp_path / 'none.py'), '--arch', 'rest_lite', '-o', str(tmp_path / 'c.py')])
    assert 'does not exist' in _refusal(
        capsys, [str(config), '--arch', 'rest_lite', '-o', str(tmp_path / 'no' / 'c.py')])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.py']


def test_configs_of_other_libraries_are_refused(tmp_path, capsys):
    config = tmp_path / 'cls.py'
    config.write_text("default_scope = 'mmpretrain'\nmodel = dict(backbone=dict(type='X'))\n")
    assert "default_scope is 'mmpretrain'" in _refusal(
        capsys, [str(config), '--arch', 'rest_lite', '-o', str(tmp_path / 'out.py')])
    assert not (tmp_path / 'out.py').exists()


def test_unknown_presets_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        swap_backbone.main(['cfg.py', '--arch', 'resnet50', '-o', 'out.py'])
    assert exit_info.value.code == 2
    assert 'rest_small' in capsys.readouterr().err  # the presets are listed


# ---------------------------------------------------------------------------------------
# In the libraries: one training step and one prediction.
# ---------------------------------------------------------------------------------------


def _library(cfg: Config) -> str:
    return cfg.default_scope


def _tiny_inputs(cfg: Config):
    """The config shrunk to SIZE x SIZE inputs: no fixed-size padding or resizing batch
    augments (LSJ pads to 1024, YOLOX resizes to 480..800), mmseg's crop size."""
    preprocessor = cfg.model.data_preprocessor
    if 'batch_augments' in preprocessor:
        preprocessor.batch_augments = None
    if _library(cfg) == 'mmseg':
        preprocessor.size = (SIZE, SIZE)
    if cfg.model.get('num_queries', 0) > 50:
        # DINO picks its queries by top-k over the encoder's tokens: 85 at 64x64, not 900
        cfg.model.num_queries = 50
        # DETR's softmax scores keep the top max_per_img of its queries
        test_cfg = cfg.model.get('test_cfg') or {}
        if test_cfg.get('max_per_img', 0) > 50:
            test_cfg.max_per_img = 50
    return cfg


def _batch(cfg: Config) -> dict:
    """Two random SIZE x SIZE images with ground truth of the config's task."""
    torch.manual_seed(0)
    if _library(cfg) == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        return demo_mm_inputs(batch_size=2, image_shapes=[(3, SIZE, SIZE)] * 2,
                              num_items=[2, 3], num_classes=3,
                              with_mask='Mask' in cfg.model.type)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    head = cfg.model.decode_head
    num_classes = (head[-1] if isinstance(head, list) else head).num_classes
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, SIZE, SIZE)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def train_step_and_predict(cfg: Config, backbones=('ResT', 'ResTV2')):
    """Build the config's model (its backbone one of ``backbones``), train one step,
    predict; check what each produced."""
    from mmengine.optim import OptimWrapper

    from rest_mm.cli.builders import build_config_model
    model = build_config_model(_tiny_inputs(cfg))
    assert backbones is None or type(model.backbone).__name__ in backbones
    data = _batch(cfg)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    model.train()
    log = model.train_step(data, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01)))
    assert log['loss'].isfinite(), log
    moved = [n for n, p in model.backbone.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > len(before) // 2, f'{len(moved)} of {len(before)} backbone tensors moved'
    model.eval()  # (not chained: some modules' train() returns None)
    with torch.no_grad():
        predictions = model.val_step(data)
    assert len(predictions) == 2
    for prediction in predictions:
        if _library(cfg) == 'mmdet':
            assert 'pred_instances' in prediction
            assert prediction.pred_instances.bboxes.shape[-1] == 4
        else:
            assert tuple(prediction.pred_sem_seg.data.shape) == (1, SIZE, SIZE)


def by_hand(tmp_path, base: str, model_delta: str) -> Config:
    """A config written by hand as the README says."""
    path = tmp_path / 'by_hand.py'
    path.write_text(f"_base_ = ['{base}']\n"
                    "custom_imports = dict(imports=['rest_mm'], allow_failed_imports=False)\n"
                    f'model = dict({model_delta})\n')
    return Config.fromfile(path)


def through_the_tool(tmp_path, base: str, arch: str = 'rest_lite') -> Config:
    out = tmp_path / 'derived.py'
    swap_backbone.main([base, '--arch', arch, '-o', str(out)])
    return Config.fromfile(out)


# The anchors: the libraries' own configs, adapted by hand as the README describes.
BACKBONE = "backbone=dict(_delete_=True, type='ResT', arch='lite', out_indices={}), "
ALL = BACKBONE.format((0, 1, 2, 3))
HAND = {
    'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py':
        ALL + f'pretrained=None, decode_head=dict(in_channels={LITE[3]}), '
              f'auxiliary_head=dict(in_channels={LITE[2]})',
    'mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py':
        ALL + f'pretrained=None, decode_head=dict(in_channels={LITE[3]}), '
              f'auxiliary_head=dict(in_channels={LITE[2]})',
    'mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py':
        ALL + f'pretrained=None, decode_head=dict(in_channels={LITE[3]}, '
              f'c1_in_channels={LITE[0]}), auxiliary_head=dict(in_channels={LITE[2]})',
    'mmseg::upernet/upernet_r50_4xb2-40k_cityscapes-512x1024.py':
        ALL + f'pretrained=None, decode_head=dict(in_channels={list(LITE)}), '
              f'auxiliary_head=dict(in_channels={LITE[2]})',
    'mmseg::mask2former/mask2former_r50_8xb2-90k_cityscapes-512x1024.py':
        ALL + f'decode_head=dict(in_channels={list(LITE)})',
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py':
        ALL + f'neck=dict(in_channels={list(LITE)})',
    'mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py':
        ALL + f'neck=dict(in_channels={list(LITE)})',
    'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py':
        BACKBONE.format((1, 2, 3)) + f'neck=dict(in_channels={list(LITE[1:])})',
    'mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco.py':
        ALL + f'panoptic_head=dict(in_channels={list(LITE)})',
}
SLOW = pytest.mark.slow
# one family of each library runs in the quick selection; each run takes tens of seconds
QUICK = {'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py',
         'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'}


def _needs(base: str):
    return needs_mmdet if base.startswith('mmdet::') else needs_mmseg


def _anchor_params():
    return [pytest.param(base, delta, id=base.split('/')[0].split('::')[1],
                         marks=[_needs(base)] + ([] if base in QUICK else [SLOW]))
            for base, delta in HAND.items()]


@pytest.mark.parametrize('base, delta', _anchor_params())
def test_the_libraries_configs_take_rest_by_hand_and_the_tool_writes_the_same_model(
        tmp_path, base, delta, capsys):
    hand = by_hand(tmp_path, base, delta)
    tool = through_the_tool(tmp_path, base)
    assert tool.model.to_dict() == hand.model.to_dict()
    out = capsys.readouterr().out
    assert 'model.backbone: ' in out and 'checked: the derived model builds' in out
    train_step_and_predict(hand)


# Further families through the tool alone: one channel level (DETR, YOLOF), three
# (YOLOX, RTMDet), reversed (YOLOv3), a cascade of mmseg heads on HRNet
# (OCRNet), an mmseg neck (Semantic FPN), and ResTV2.
TOOL_ONLY = [
    ('mmdet::detr/detr_r50_8xb2-150e_coco.py', 'rest_lite', 'model.neck.in_channels: [2048]'),
    ('mmdet::yolof/yolof_r50-c5_8xb8-1x_coco.py', 'rest_lite', 'model.neck.in_channels: 2048'),
    ('mmdet::yolox/yolox_tiny_8xb8-300e_coco.py', 'rest_lite',
     'model.neck.in_channels: [96, 192, 384] -> [128, 256, 512]'),
    ('mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py', 'rest_lite',
     'model.neck.in_channels: [96, 192, 384] -> [128, 256, 512]'),
    ('mmdet::yolo/yolov3_d53_8xb8-320-273e_coco.py', 'rest_lite',
     'model.neck.in_channels: [1024, 512, 256] -> [512, 256, 128]'),
    ('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', 'restv2_tiny',
     'model.neck.in_channels: [256, 512, 1024, 2048] -> [96, 192, 384, 768]'),
    ('mmseg::ocrnet/ocrnet_hr18s_4xb2-40k_cityscapes-512x1024.py', 'rest_lite',
     'model.decode_head[1].in_channels: [18, 36, 72, 144] -> [64, 128, 256, 512]'),
    ('mmseg::sem_fpn/fpn_r50_4xb2-80k_cityscapes-512x1024.py', 'rest_lite',
     'model.neck.in_channels'),
    ('mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py', 'rest_lite',
     'model.decode_head.in_channels: [32, 64, 160, 256] -> [64, 128, 256, 512]'),
]


@pytest.mark.parametrize('base, arch, change', [
    pytest.param(b, a, c, id=b.split('/')[0].split('::')[1], marks=[_needs(b), SLOW])
    for b, a, c in TOOL_ONLY])
def test_the_tool_adapts_more_families(tmp_path, capsys, base, arch, change):
    cfg = through_the_tool(tmp_path, base, arch)
    assert change in capsys.readouterr().out
    assert cfg.model.backbone.type == ('ResT' if arch.startswith('rest_') else 'ResTV2')
    train_step_and_predict(cfg)


@pytest.mark.parametrize('base, reason', [
    pytest.param('mmdet::ssd/ssd300_coco.py', "SSD's neck keeps SSDVGG's two maps",
                 marks=needs_mmdet, id='ssd'),
    pytest.param('mmdet::detectors/detectors_cascade-rcnn_r50_1x_coco.py',
                 "DetectoRS's backbone is recursive", marks=needs_mmdet, id='detectors'),
    pytest.param('mmdet::faster_rcnn/faster-rcnn_r50-caffe_c4-1x_coco.py',
                 'takes the backbone\'s maps through parts of its own', marks=needs_mmdet,
                 id='c4'),
    pytest.param('mmdet::faster_rcnn/faster-rcnn_r50-caffe-dc5_1x_coco.py',
                 'takes the backbone\'s maps through parts of its own', marks=needs_mmdet,
                 id='dc5-not-understood'),
    # CenterNet's neck reads only the last of ResNet's four maps: no rule explains 512
    pytest.param('mmdet::centernet/centernet_r18_8xb16-crop512-140e_coco.py',
                 'model.neck.in_channels=512 is not explained', marks=needs_mmdet,
                 id='centernet-not-understood'),
    pytest.param('mmseg::vit/vit_vit-b16_mln_upernet_8xb2-80k_ade20k-512x512.py',
                 r'strides (16, 16, 16, 16)', marks=needs_mmseg, id='vit'),
])
def test_families_that_cannot_take_a_pyramid_are_refused(tmp_path, capsys, base, reason):
    out = tmp_path / 'derived.py'
    assert reason in _refusal(capsys, [base, '--arch', 'rest_lite', '-o', str(out)])
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


@needs_mmseg
def test_mmseg_base_configs_pretrained_is_a_clear_error_until_set_to_none(tmp_path):
    from rest_mm.cli.builders import build_config_model
    cfg = by_hand(tmp_path, 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py',
                  ALL + f'decode_head=dict(in_channels={LITE[3]}), '
                        f'auxiliary_head=dict(in_channels={LITE[2]})')
    assert cfg.model.pretrained == 'open-mmlab://resnet50_v1c'
    with pytest.raises(ValueError, match=r"pretrained='open-mmlab://resnet50_v1c' names "
                                         r'another architecture.*model\.pretrained=None'):
        build_config_model(cfg)


@needs_mmseg
def test_mmseg_model_pretrained_path_loads_the_backbone(tmp_path):
    """``model.pretrained=PATH`` (the older spelling) reaches ResT through EncoderDecoder and
    loads as init_cfg does."""
    from rest_mm import ResT
    from rest_mm.cli.builders import build_config_model
    weights = ResT(arch='lite').state_dict()
    path = tmp_path / 'rest_lite.pth'
    torch.save(weights, path)
    cfg = by_hand(tmp_path, 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py',
                  ALL + f'pretrained={str(path)!r}, decode_head=dict(in_channels={LITE[3]}), '
                        f'auxiliary_head=dict(in_channels={LITE[2]})')
    with pytest.warns(FutureWarning, match='pretrained is deprecated'):
        model = build_config_model(cfg)
    model.init_weights()
    for key, value in weights.items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, rtol=0, atol=0)


@needs_mmdet
def test_the_written_config_is_a_thin_delta_and_the_checkpoint_is_named(tmp_path, capsys):
    base = tmp_path / 'base.py'
    base.write_text("_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']\n"
                    "custom_imports = dict(imports=['math'], allow_failed_imports=False)\n")
    out = tmp_path / 'sub' / 'derived.py'
    out.parent.mkdir()
    out.write_text('# an older version, replaced\n')
    swap_backbone.main([str(base), '--arch', 'rest_small', '-o', str(out), '--checkpoint',
                        'checkpoints/rest_small.pth'])
    text = out.read_text()
    assert text.splitlines()[1] == "_base_ = ['../base.py']"
    cfg = Config.fromfile(out)
    assert cfg.custom_imports.imports == ['math', 'rest_mm']
    assert cfg.model.backbone.to_dict() == dict(
        type='ResT', arch='small', out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/rest_small.pth'))
    assert cfg.model.neck.in_channels == [64, 128, 256, 512]
    # the delta holds only what changed: the rest of the neck comes from the base
    assert "'start_level'" not in text and cfg.model.neck.start_level == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ['derived.py']
    assert 'random initial weights' not in capsys.readouterr().out


@SLOW
@needs_mmdet
def test_the_command_line_entry(tmp_path):
    out = tmp_path / 'derived.py'
    result = run([sys.executable, 'tools/swap_backbone.py',
                  'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '--arch', 'rest_small',
                  '-o', out])
    assert result.stdout.splitlines()[-1] == f'wrote {out}'
    assert Config.fromfile(out).model.backbone.arch == 'small'
    refused = subprocess.run([sys.executable, 'tools/swap_backbone.py', 'mmdet::ssd/ssd300_coco.py',
                              '--arch', 'rest_small', '-o', str(tmp_path / 'ssd.py')],
                             capture_output=True, text=True, cwd=REPO, timeout=600)
    assert refused.returncode == 2 and refused.stderr.count('\n') == 1, refused.stderr
