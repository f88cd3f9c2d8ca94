"""Convert an authors' ResT/ResTv2 checkpoint to rest_mm's key names.

The kind is recognised by its keys (:func:`rest_mm.weights.convert_released`): ImageNet
backbones become backbone weights for ``init_cfg``; the authors' detectron2 detectors and
mmseg 0.x segmentors become whole mmdet / mmseg 1.x checkpoints for ``tools/test.py``.
Converting the output again changes nothing; SRC is never written to, DST atomically.
"""
import argparse
import os
from pathlib import Path

import torch

from rest_mm.cli import errors
from rest_mm.cli.safe_files import atomic_output, check_output_path
from rest_mm.weights import check_finite, convert_released, read_checkpoint, suggest_arch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='checkpoint to convert')
    parser.add_argument('dst', help='where to write the converted checkpoint (not SRC)')
    parser.add_argument('--allow-non-finite', action='store_true',
                        help='convert weights holding NaN or Inf (refused by default: a '
                        'damaged file or a diverged run)')
    errors.add_debug_argument(parser)
    args = parser.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if dst.is_dir():
        parser.error(f'DST {args.dst!r} is a directory; give a file name')
    # realpath, not Path.resolve: resolve raises RuntimeError on a symbolic link loop
    if os.path.realpath(src) == os.path.realpath(dst) or (dst.exists() and src.exists()
                                          and os.path.samefile(src, dst)):
        parser.error(f'DST {args.dst!r} is SRC: the conversion drops keys (the classifier, '
                     f'detectron2 buffers), so it never overwrites its source; give another path')
    return args


@errors.handled
def main(argv=None):
    args = parse_args(argv)
    try:
        weights, meta = convert_released(read_checkpoint(args.src))
        if not args.allow_non_finite:
            check_finite(weights, 'the converted weights', opt_out='--allow-non-finite')
    except (ValueError, RuntimeError) as error:  # what is wrong with SRC
        raise errors.UserError(f'{args.src}: {error}') from error
    meta = dict(meta, converted_from=Path(args.src).name)
    check_output_path(args.dst, 'file', option='DST',
                      needed_bytes=sum(t.numel() * t.element_size() for t in weights.values()
                                       if isinstance(t, torch.Tensor)))
    # a failed or interrupted save never leaves a truncated checkpoint at DST
    with atomic_output(args.dst, 'save the converted checkpoint to',
                       keep_extension=False) as temporary:
        torch.save({'state_dict': weights, 'meta': meta}, temporary)
    if meta['kind'] == 'backbone':
        fits = suggest_arch(weights)
    else:
        fits = (f'evaluate with `python tools/test.py {meta["config"]} {args.dst}`')
    print(f'{len(weights)} tensors ({meta["kind"]}) written to {args.dst}; {fits}')
    return meta


if __name__ == '__main__':
    main()
