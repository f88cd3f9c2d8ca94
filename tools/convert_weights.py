"""Convert an authors' ResT/ResTv2 checkpoint to rest_mm's key names.

    python tools/convert_weights.py rest_small.pth rest_small_mm.pth

Accepts the released ImageNet files, detectron2 conversions, raw state dicts and our own
detector/segmentor checkpoints. The output is ``{'state_dict': weights, 'meta': ...}``,
loadable with ``init_cfg=dict(type='Pretrained', checkpoint=DST)``; converting it again
changes nothing.
"""
import argparse
from pathlib import Path

import torch

from rest_mm.checkpoint import convert_checkpoint, read_checkpoint, suggest_arch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='checkpoint to convert (path or URL)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    weights = convert_checkpoint(read_checkpoint(args.src))
    if not any(k.startswith('stages.') for k in weights):
        raise SystemExit(f'{args.src} holds no ResT/ResTV2 backbone weights '
                         f'(first keys: {list(weights)[:5]})')
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state_dict': weights, 'meta': {'converted_from': str(args.src)}}, args.dst)
    print(f'{len(weights)} tensors written to {args.dst}; {suggest_arch(weights)}')


if __name__ == '__main__':
    main()
