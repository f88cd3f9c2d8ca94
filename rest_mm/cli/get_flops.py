"""Parameters and FLOPs of the backbones and of each config's model, beside the authors'
published numbers.

Backbones are counted at 224×224 (as published, for ImageNet classification); config
models at their standard test size: 1280×800 (W×H) for detection, 512×2048 (H×W) for
segmentation. Counting uses mmengine's ``FlopAnalyzer`` with the handle of
``rest_mm.flops`` (so ``scaled_dot_product_attention`` and the head mixing count); one
FLOP is one multiply-accumulate, as in mmengine, mmdet and mmseg.

Examples::

    python tools/get_flops.py                         # backbones and every config
    python tools/get_flops.py --no-configs            # backbones only
    python tools/get_flops.py --configs configs/segmentation/upernet_restv2_tiny_ade20k.py

The column "pub. convention" leaves out what the authors' ResT (v1) count appears to
leave out (the attention products ``q·kᵀ``, ``attn·v`` and the stem's stride-1 ``conv2``),
for comparison with their table; the complete count is the one to compare with other
backbones (docs/performance.md, "Parameters and FLOPs", has the figures). The configs'
published figures are read from the model index (``configs/*/metafile.yml``).
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from rest_mm.cli import errors, model_index
from rest_mm.cli.builders import build_config_model, build_ours, data_samples, parse_size
from rest_mm.presets import PRESET_NAMES

REPO = Path(__file__).resolve().parents[2]
# ARCHITECTURE.md: ImageNet models with their 1000-class head; params in M, FLOPs in G @224.
PUBLISHED_BACKBONES = {
    'rest_lite': (10.49, 1.4), 'rest_small': (13.66, 1.9), 'rest_base': (30.28, 4.3),
    'rest_large': (51.63, 7.9), 'restv2_tiny': (30, 4.1), 'restv2_small': (41, 6.0),
    'restv2_base': (56, 7.9), 'restv2_large': (87, 13.8),
}
DETECTION_SIZE = (800, 1280)
SEGMENTATION_SIZE = (512, 2048)
CONFIG_DIRS = ('configs/detection', 'configs/segmentation')


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backbone_flops(name: str, size: Tuple[int, int]) -> Dict[str, float]:
    """Params (backbone, and with an ImageNet head) and FLOPs by operator."""
    from rest_mm.flops import flop_analyzer
    model = build_ours(name).eval()
    analyzer = flop_analyzer(model, (torch.randn(1, 3, *size), ))
    head = model.embed_dims[-1] * 1000 + 1000
    # the published v1 convention: without attention products and the stem's conv2
    by_operator = analyzer.by_operator()
    left_out = by_operator.get('matmul', 0) + by_operator.get('scaled_dot_product_attention', 0)
    if hasattr(model.stem, 'conv2'):
        left_out += analyzer.total('stem.conv2')
    return dict(params=count_params(model), params_with_head=count_params(model) + head,
                flops=analyzer.total(), flops_published_convention=analyzer.total() - left_out)


class _TensorMode(nn.Module):
    """Traces a detector's or segmentor's ``tensor`` mode for the analyser."""

    def __init__(self, model: nn.Module, data_samples):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, images):
        return self.model._forward(images, self.data_samples)


def config_flops(path: str, size: Optional[Tuple[int, int]] = None) -> Dict[str, float]:
    from rest_mm.flops import flop_analyzer
    model = build_config_model(path).eval()
    if size is None:
        size = SEGMENTATION_SIZE if model.default_scope == 'mmseg' else DETECTION_SIZE
    images = torch.randn(1, 3, *size)
    wrapper = _TensorMode(model, data_samples(model, 1, size))
    with torch.no_grad():
        flops = flop_analyzer(wrapper, (images, )).total()
    return dict(params=count_params(model), flops=flops, size=size)


def find_configs() -> List[str]:
    found = []
    for folder in CONFIG_DIRS:
        found += sorted(str(p) for p in (REPO / folder).glob('*.py'))
    return found


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n', 1)[1])
    parser.add_argument('--backbones', nargs='*', default=list(PRESET_NAMES),
                        choices=PRESET_NAMES, metavar='NAME',
                        help=f'backbones to count (default: all of {list(PRESET_NAMES)})')
    parser.add_argument('--size', type=parse_size, default=(224, 224),
                        help='backbone input size HxW (default 224x224)')
    parser.add_argument('--configs', nargs='*', default=None,
                        help='config files (default: every file in ' + ', '.join(CONFIG_DIRS) + ')')
    parser.add_argument('--no-configs', action='store_true', help='count the backbones only')
    parser.add_argument('--config-size', type=parse_size, default=None,
                        help='override the standard test size HxW for config models')
    errors.add_debug_argument(parser)
    args = parser.parse_args(argv)
    # before any counting: a missing file would otherwise stop the run after the backbones
    for path in args.configs or ():
        if not Path(path).is_file():
            parser.error(f'--configs {path}: no such config file')
    return args


@errors.handled
def main(argv=None):
    args = parse_args(argv)
    size = f'{args.size[0]}x{args.size[1]}'
    if args.backbones:
        print(f'| backbone | params M | with 1000-class head | published params M | '
              f'GFLOPs @{size} | pub. convention | published GFLOPs @224 |')
        print('|---|---|---|---|---|---|---|')
        for name in args.backbones:
            print(f'  counting {name}', file=sys.stderr, flush=True)
            r = backbone_flops(name, args.size)
            params, flops = PUBLISHED_BACKBONES[name]
            convention = (f'{r["flops_published_convention"] / 1e9:.3f}'
                          if name.startswith('rest_') else '')
            print(f'| {name} | {r["params"] / 1e6:.2f} | {r["params_with_head"] / 1e6:.2f} | '
                  f'{params} | {r["flops"] / 1e9:.3f} | {convention} | {flops} |')
    if args.no_configs:
        return
    configs = find_configs() if args.configs is None else args.configs
    if not configs:
        print(f'no config files found in {", ".join(CONFIG_DIRS)}: nothing to count for models')
        return
    # the published figures of the shipped configs (none in an installed package)
    index = ({m['Name']: m for m in model_index.models()}
             if (REPO / model_index.INDEX).is_file() else {})
    print('\n| config | input H×W | params M | GFLOPs | published GFLOPs |')
    print('|---|---|---|---|---|')
    for path in configs:
        print(f'  counting {path}', file=sys.stderr, flush=True)
        r = config_flops(path, args.config_size)
        published = (model_index.flops(index[Path(path).stem], published=True)
                     if Path(path).stem in index else None)
        published = '' if published is None else f'{published:g}'
        print(f'| {Path(path).stem} | {r["size"][0]}×{r["size"][1]} | {r["params"] / 1e6:.2f} | '
              f'{r["flops"] / 1e9:.1f} | {published} |')


if __name__ == '__main__':
    main()
