"""Put ResT or ResTV2 in place of the backbone of an mmdet or mmseg config: a thin derived
config (``_base_`` + the delta) that builds and trains.

The swap a user does by hand, done mechanically and checked:

1. The original backbone is built and run on a 128×128 input, which measures the channels
   and stride of each map it feeds the model (no table of other backbones to go stale).
2. Each map is taken from the ResT stage of the same stride (strides 4, 8, 16, 32): anchor
   generators, RoI extractors and ``strides`` fields were set for those strides, so they
   stay right. Only mmseg heads, which resize their inputs, also accept a dilated backbone
   (strides 4, 8, 8, 8): its maps come from consecutive stages instead, and the note says so.
3. Every channel count that the first consumer of those maps keeps (the neck, or with no
   neck the heads) is rewritten. A value is rewritten only when it is explained by the
   measured channels: the whole list (FPN, ChannelMapper, MaskFormer heads), the list
   reversed (YOLOv3's neck), the entries chosen by a head's ``in_index``, the single output
   (DETR, YOLOF), or the first output for DeepLabV3+'s ``c1_in_channels``.
4. ``model.pretrained`` (mmseg's base configs name another backbone's weights there) is set
   to None and the backbone replaced with ``_delete_=True``.
5. The derived config is written to a temporary file, loaded, built, its backbone (and neck)
   run, and only then moved into place.

Anything it cannot explain is refused with exit status 2 and one line saying why; it never
writes a config it did not understand. SyncBN is kept: it is what multi-GPU training
needs, and in a single process torch's ``SyncBatchNorm`` computes plain batch norm.
"""
import argparse
import ast
import copy
import importlib.util
import os.path as osp
import pprint
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config

from rest_mm.cli import errors
from rest_mm.cli.builders import build_config_model
from rest_mm.cli.safe_files import OutputError, atomic_output, check_output_path
from rest_mm.presets import NUM_STAGES, PRESET_NAMES, parse_preset_name, resolve_arch

STAGE_STRIDES = tuple(4 * 2**i for i in range(NUM_STAGES))
PROBE_SIZE = 128  # a whole multiple of every stride a backbone may have, up to 128
LIBRARIES = ('mmdet', 'mmseg')
# Keys besides ``in_channels`` that hold backbone channels, and which output they read:
# DeepLabV3+'s low-level branch (DepthwiseSeparableASPPHead) reads the first map.
EXTRA_CHANNEL_KEYS = {'c1_in_channels': 0}
# Families whose consumers are tied to the original backbone beyond channels and strides.
REFUSED_TYPES = {
    'SSDNeck': "SSD's neck keeps SSDVGG's two maps and builds fixed extra layers whose "
               "channels the head lists; a 4-stage pyramid does not fit it",
    'SSDVGG': "SSD's neck keeps SSDVGG's two maps and builds fixed extra layers whose "
              "channels the head lists; a 4-stage pyramid does not fit it",
    'RFP': "DetectoRS's recursive feature pyramid feeds the neck's outputs back into a "
           "second ResNet (rfp_backbone); ResT takes no such input",
    'DetectoRS_ResNet': "DetectoRS's backbone is recursive (it takes the RFP neck's outputs "
                        "back in); ResT takes no such input",
    'DetectoRS_ResNeXt': "DetectoRS's backbone is recursive (it takes the RFP neck's outputs "
                         "back in); ResT takes no such input",
}


class Refused(errors.UserError):
    """The config cannot take a ResT: the message is one line saying why."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Write a config that is CONFIG with its backbone replaced by ResT or '
        'ResTV2 (channels and strides of the neck or heads adapted)')
    parser.add_argument('config', help="an mmdet or mmseg config: a file, or 'mmdet::PATH' / "
                        "'mmseg::PATH' inside the installed library")
    parser.add_argument('--arch', required=True, type=str.lower, choices=PRESET_NAMES,
                        metavar='PRESET', help=f'the backbone: one of {", ".join(PRESET_NAMES)}')
    parser.add_argument('-o', '--out', required=True, help='the config to write (.py)')
    parser.add_argument('--checkpoint', help='ImageNet (or converted) weights for the backbone, '
                        "written as init_cfg=dict(type='Pretrained', checkpoint=...); without "
                        'it the backbone starts from random weights')
    errors.add_debug_argument(parser)
    return parser.parse_args(argv)


def _strides(maps: Sequence[torch.Tensor], config: str) -> List[int]:
    strides = []
    for i, feature in enumerate(maps):
        height, width = feature.shape[-2:]
        stride = PROBE_SIZE // height if height else 0
        if height * stride != PROBE_SIZE or width * stride != PROBE_SIZE:
            raise Refused(f'{config}: backbone output {i} is {height}x{width} for a '
                          f'{PROBE_SIZE}x{PROBE_SIZE} input, which is no whole stride')
        strides.append(stride)
    return strides


def measure_backbone(cfg: Config, config: str) -> Tuple[str, List[int], List[int]]:
    """The original backbone's type, and the channels and strides of each map it returns
    (measured on a ``PROBE_SIZE`` square of zeros)."""
    backbone_type = cfg.model.backbone.get('type', '?')
    try:
        model = build_config_model(cfg)
    except Exception as error:  # any failure to build means we cannot measure it
        raise Refused(f'{config}: the original model could not be built to measure its '
                      f'backbone ({type(error).__name__}: {_first_line(error)})') from error
    in_channels = cfg.model.backbone.get('in_channels', 3)
    with torch.no_grad():
        try:
            model.eval()  # (some backbones' train() returns None, so no chaining)
            maps = model.backbone(torch.zeros(1, in_channels, PROBE_SIZE, PROBE_SIZE))
        except Exception as error:
            raise Refused(f'{config}: the original backbone {backbone_type} did not run on a '
                          f'{PROBE_SIZE}x{PROBE_SIZE} input ({type(error).__name__}: '
                          f'{_first_line(error)})') from error
    if not isinstance(maps, (list, tuple)) or not maps or \
            not all(isinstance(m, torch.Tensor) and m.dim() == 4 for m in maps):
        raise Refused(f'{config}: the original backbone {backbone_type} returns '
                      f'{type(maps).__name__}, not a sequence of NCHW maps')
    return backbone_type, [m.shape[1] for m in maps], _strides(maps, config)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [''])[0][:200]


def choose_stages(strides: Sequence[int], allow_dilated: bool,
                  config: str) -> Tuple[Tuple[int, ...], bool]:
    """ResT's ``out_indices`` for maps of these strides, and whether the strides match.

    Raises:
        Refused: The strides cannot be served: not increasing, outside 4..32, or (when
            ``allow_dilated`` is False) not exactly those of ResT's stages.
    """
    stage_of = {s: i for i, s in enumerate(STAGE_STRIDES)}
    exact = [stage_of.get(s) for s in strides]
    if None not in exact and all(a < b for a, b in zip(exact, exact[1:])):
        return tuple(exact), True
    why = (f'{config}: the original backbone feeds maps of strides {tuple(strides)}; ResT\'s '
           f'stages have strides {STAGE_STRIDES}')
    if not allow_dilated:
        raise Refused(why + ', and this model\'s anchors/RoI extractors are set for the '
                      'original strides')
    if any(b < a for a, b in zip(strides, strides[1:])):
        raise Refused(why + ', and these do not grow from map to map')
    stages, previous = [], -1
    for stride in strides:
        # a dilated backbone keeps its resolution from some stage on; the next ResT stage
        # plays that stage's part (at the coarser stride)
        stage = max(stage_of.get(stride, NUM_STAGES), previous + 1)
        if stride > STAGE_STRIDES[-1] or stride < STAGE_STRIDES[0] or stage >= NUM_STAGES:
            raise Refused(why + ', and no increasing choice of stages serves them')
        stages.append(stage)
        previous = stage
    return tuple(stages), False


def map_channels(value, old: Sequence[int], new: Sequence[int], in_index=None):
    """``value`` (a consumer's channel count or list) rewritten from the original
    backbone's channels ``old`` to ``new``, or None where ``old`` does not explain it."""
    is_list = isinstance(value, (list, tuple))
    try:
        if isinstance(in_index, (list, tuple)):
            if is_list and list(value) == [old[i] for i in in_index]:
                return type(value)(new[i] for i in in_index)
            return None
        if in_index is not None:
            return new[in_index] if not is_list and value == old[in_index] else None
    except (IndexError, TypeError):
        return None
    if is_list and list(value) == list(old):
        return type(value)(new)
    if is_list and list(value) == list(old)[::-1]:
        return type(value)(new[::-1])
    if isinstance(value, int) and len(old) == 1 and value == old[0]:
        return new[0]
    return None


def _channel_keys(part: dict) -> List[str]:
    return [k for k in part if k.endswith('in_channels')]


def _nested_channel_keys(part: dict) -> bool:
    """Whether a dict inside ``part`` (not ``part`` itself) names input channels."""
    def search(value, depth):
        if isinstance(value, dict):
            if depth and _channel_keys(value):
                return True
            return any(search(v, depth + 1) for v in value.values())
        if isinstance(value, (list, tuple)):
            return any(search(v, depth + 1) for v in value)
        return False
    return search(part, 0)


class _Consumers:
    """The rewrite of the parts of ``model`` that take the backbone's maps."""

    def __init__(self, model: dict, library: str, old: List[int], new: List[int],
                 exact_strides: bool, config: str):
        self.model, self.library, self.old, self.new = model, library, old, new
        self.exact_strides, self.config = exact_strides, config
        self.delta: Dict[str, object] = {}
        self.changes: List[str] = []

    def rewrite_part(self, part: dict, where: str, is_head: bool) -> dict:
        """A copy of ``part`` with its channel keys rewritten (refused where unexplained)."""
        part = copy.deepcopy(part)
        keys = _channel_keys(part)
        if not keys:
            raise Refused(f'{self.config}: {where} ({part.get("type")}) takes the backbone\'s '
                          f'maps but names no in_channels; the tool does not know how it '
                          f'reads them')
        if not self.exact_strides and any('strides' in k for k in part):
            raise Refused(f'{self.config}: {where} ({part.get("type")}) is set for the '
                          f'original strides, which ResT cannot reproduce')
        for key in keys:
            if key == 'in_channels':
                in_index = part.get('in_index')
                if in_index is None and is_head and self.library == 'mmseg' and \
                        isinstance(part[key], int):
                    in_index = -1  # mmseg's BaseDecodeHead default
            elif key in EXTRA_CHANNEL_KEYS:
                in_index = EXTRA_CHANNEL_KEYS[key]
            else:
                raise Refused(f'{self.config}: {where}.{key} is a channel setting the tool '
                              f'does not know')
            value = map_channels(part[key], self.old, self.new, in_index)
            if value is None:
                raise Refused(f'{self.config}: {where}.{key}={part[key]!r} is not explained by '
                              f"the original backbone's output channels {self.old}"
                              + (f' (in_index={in_index!r})' if in_index is not None else ''))
            self.changes.append(f'{where}.{key}: {part[key]!r} -> {value!r}')
            part[key] = value
        return part

    def rewrite_key(self, key: str, is_head: bool):
        """Rewrite ``model[key]``: a dict (the delta holds only what changed) or a list of
        dicts (written whole: a list in a derived config replaces the base's)."""
        value = self.model[key]
        if isinstance(value, dict):
            rewritten = self.rewrite_part(value, f'model.{key}', is_head)
            self.delta[key] = {k: v for k, v in rewritten.items() if v != value.get(k)}
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict)
                                                                for v in value):
            # a list of necks is a chain (only the first takes the backbone's maps); a list
            # of mmseg heads (cascade, auxiliary) all read the backbone
            if key == 'neck':
                parts = [self.rewrite_part(value[0], 'model.neck[0]', is_head)] + \
                    list(copy.deepcopy(value[1:]))
            else:
                parts = [self.rewrite_part(v, f'model.{key}[{i}]', is_head)
                         for i, v in enumerate(value)]
            self.delta[key] = type(value)(parts)
        else:
            raise Refused(f'{self.config}: model.{key} is a {type(value).__name__}, not a '
                          f'config dict or a list of them')

    def rewrite(self):
        neck = self.model.get('neck')
        if neck:
            self.rewrite_key('neck', is_head=False)
            return
        heads = [k for k, v in self.model.items() if k.endswith('_head') and v]
        if self.library == 'mmseg':
            for key in heads:
                self.rewrite_key(key, is_head=True)
            return
        for key in heads:
            value = self.model[key]
            if not isinstance(value, dict):
                raise Refused(f'{self.config}: model.{key} is a {type(value).__name__}; with '
                              f'no neck the tool expects each head as one config dict')
            if _channel_keys(value):
                self.rewrite_key(key, is_head=True)
            elif _nested_channel_keys(value):
                # e.g. a C4 RoI head, whose shared head is the original backbone's stage 4
                raise Refused(f'{self.config}: with no neck, model.{key} '
                              f'({value.get("type")}) takes the backbone\'s maps through '
                              f'parts of its own; the tool does not know how to adapt them')
            # else: a head that takes no feature maps (e.g. panoptic fusion)
        if not self.changes:
            raise Refused(f'{self.config}: found no neck or head that takes the backbone\'s '
                          f'maps')


def _refuse_known(model: dict, config: str):
    parts = [model.get('backbone')] + (model['neck'] if isinstance(model.get('neck'), list)
                                        else [model.get('neck')])
    for part in parts:
        if isinstance(part, dict) and part.get('type') in REFUSED_TYPES:
            raise Refused(f'{config}: {REFUSED_TYPES[part["type"]]}')


def _plain(value, where: str, config: str):
    """``value`` as plain Python literals (ConfigDicts to dicts), refused where it is
    something a config file cannot spell (a class, a function)."""
    if isinstance(value, dict):
        return {k: _plain(v, f'{where}.{k}', config) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, where, config) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise Refused(f'{config}: {where} holds a {type(value).__name__}, which a derived config '
                  f'cannot write')


def plan_swap(cfg: Config, config: str, preset: str,
              checkpoint: Optional[str] = None) -> Tuple[dict, List[str]]:
    """The derived config's contents (without ``_base_``) and what changed, one line each.

    Raises:
        Refused: Saying why the config cannot take the backbone.
    """
    library = cfg.get('default_scope')
    if library not in LIBRARIES:
        raise Refused(f'{config}: default_scope is {library!r}; the tool adapts mmdet and '
                      f'mmseg configs')
    model = cfg.get('model')
    if not isinstance(model, dict) or not isinstance(model.get('backbone'), dict):
        raise Refused(f'{config}: no model.backbone (a wrapper such as a semi-supervised or '
                      f'tracking model keeps it elsewhere)')
    model = model.to_dict()
    _refuse_known(model, config)
    model_name, arch = parse_preset_name(preset)
    dims = resolve_arch(arch, model_name)['embed_dims']
    backbone_type, old, strides = measure_backbone(cfg, config)
    stages, exact = choose_stages(strides, allow_dilated=library == 'mmseg', config=config)
    new = [dims[i] for i in stages]
    consumers = _Consumers(model, library, old, new, exact, config)
    consumers.rewrite()

    backbone = dict(_delete_=True, type=model_name, arch=arch, out_indices=stages)
    in_channels = model['backbone'].get('in_channels', 3)
    if in_channels != 3:
        backbone['in_channels'] = in_channels
    if checkpoint:
        backbone['init_cfg'] = dict(type='Pretrained', checkpoint=checkpoint)
    changes = [f'model.backbone: {backbone_type} -> {model_name}(arch={arch!r}, out_indices='
               f'{stages}); maps of strides {tuple(strides)}, channels {old} -> '
               f'{[STAGE_STRIDES[i] for i in stages]}, {new}'
               + ('' if checkpoint else '; random initial weights (no --checkpoint)')]
    if not exact:
        changes.append('note: the original backbone is dilated; ResT\'s maps are coarser '
                       'and the heads (which resize their inputs) take them as they are')
    changes += consumers.changes
    delta_model = dict(backbone=backbone, **consumers.delta)
    if model.get('pretrained') is not None:
        delta_model['pretrained'] = None
        changes.append(f'model.pretrained: {model["pretrained"]!r} -> None')
    imports = cfg.get('custom_imports', {}).get('imports', [])
    imports = [imports] if isinstance(imports, str) else list(imports)
    derived = dict(custom_imports=dict(
        imports=imports + [m for m in ['rest_mm'] if m not in imports],
        allow_failed_imports=cfg.get('custom_imports', {}).get('allow_failed_imports', False)),
        model=delta_model)
    if 'rest_mm' not in imports:
        changes.append('custom_imports: + rest_mm')
    if 'SyncBN' in repr(model):
        changes.append('note: SyncBN kept (for multi-GPU training; in one process it '
                       'computes plain batch norm)')
    return _plain(derived, 'model', config), changes


def render(base: str, derived: dict, source: str, preset: str) -> str:
    """The derived config's text."""
    lines = [f'# {preset} in place of the backbone of {source}, written by '
             f'tools/swap_backbone.py', f'_base_ = [{base!r}]']
    for key, value in derived.items():
        lines.append(f'{key} = {pprint.pformat(value, width=96, sort_dicts=False)}')
    text = '\n'.join(lines) + '\n'
    ast.parse(text)  # what pformat wrote from plain literals is Python
    return text


def check_derived(path: str, config: str, in_channels: int):
    """Build the derived model and run its backbone (and neck) once."""
    try:
        model = build_config_model(Config.fromfile(path))
        model.eval()
        with torch.no_grad():
            model.extract_feat(torch.zeros(1, in_channels, PROBE_SIZE, PROBE_SIZE))
    except Exception as error:
        raise Refused(f'{config}: the derived config did not build and run '
                      f'({type(error).__name__}: {_first_line(error)})') from error


def config_file(config: str) -> str:
    """The file of ``config``: a path as it is, ``'mmdet::REL'`` / ``'mmseg::REL'`` in the
    installed library's configs (as ``_base_`` resolves them).

    Raises:
        Refused: Another library's prefix, or no such file.
    """
    if '::' not in config:
        path = config
    else:
        library, relative = config.split('::', 1)
        spec = importlib.util.find_spec(library) if library in LIBRARIES else None
        if spec is None:
            raise Refused(f'{config}: the prefix must name an installed library of '
                          f'{", ".join(LIBRARIES)}')
        path = osp.join(osp.dirname(spec.origin), '.mim', 'configs', relative)
    if not osp.isfile(path):
        raise Refused(f'{config}: no such config file')
    return path


def _base_reference(config: str, out: str) -> str:
    """How the derived config at ``out`` names ``config`` in ``_base_``."""
    if '::' in config:
        return config
    return osp.relpath(osp.abspath(config), osp.dirname(osp.abspath(out)))


def swap(config: str, preset: str, out: str, checkpoint: Optional[str] = None) -> List[str]:
    """Write the derived config to ``out`` (atomically) and return what changed.

    Raises:
        Refused: The config cannot take the backbone, or ``out`` is not writable as asked.
    """
    if not out.endswith('.py'):
        raise Refused(f'{out}: the output must be a .py config')
    path = config_file(config)
    if osp.realpath(path) == osp.realpath(out):
        raise Refused(f'{out} is the input config; write the derived config elsewhere')
    out_dir = osp.dirname(osp.abspath(out))
    if not osp.isdir(out_dir):
        raise Refused(f'{out}: the folder {out_dir} does not exist')
    try:  # before the work (building and running the derived model): a writable file
        check_output_path(out, 'file', option='-o')
    except OutputError as error:
        raise Refused(str(error)) from error
    try:
        cfg = Config.fromfile(path)
    except Exception as error:
        raise Refused(f'{config}: could not be loaded ({type(error).__name__}: '
                      f'{_first_line(error)})') from error
    derived, changes = plan_swap(cfg, config, preset, checkpoint)
    text = render(_base_reference(config, out), derived, config, preset)
    # the temporary file sits beside ``out`` so that _base_ resolves; it takes the place of
    # ``out`` only once the derived config is checked
    try:
        with atomic_output(out) as temporary:
            with open(temporary, 'w') as file:
                file.write(text)
            check_derived(temporary, config, derived['model']['backbone'].get('in_channels', 3))
    except OutputError as error:  # a read-only folder, a full disk
        raise Refused(str(error)) from error
    return changes + ['checked: the derived model builds, and its backbone'
                      + (' and neck' if cfg.model.get('neck') else '')
                      + f' run on a {PROBE_SIZE}x{PROBE_SIZE} input']


@errors.handled
def main(argv=None):
    """Command-line entry: prints what changed, or exits with status 2 and one line saying
    why the config was refused (:mod:`rest_mm.cli.errors`)."""
    args = parse_args(argv)
    changes = swap(args.config, args.arch, args.out, args.checkpoint)
    for line in changes:
        print(f'  {line}')
    print(f'wrote {args.out}')
