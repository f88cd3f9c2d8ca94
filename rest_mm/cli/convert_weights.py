"""Convert an authors' ResT/ResTv2 checkpoint to rest_mm's key names.

    python tools/convert_weights.py rest_small.pth checkpoints/rest_small.pth
    python tools/convert_weights.py retinanet_rest_small.pth retinanet_rest_small_mm.pth
    python tools/test.py configs/detection/retinanet_rest_small_coco.py retinanet_rest_small_mm.pth

The kind of checkpoint is recognised by its keys: an ImageNet backbone (the authors'
release, a detectron2 conversion of it, or a detector/segmentor trained with this repo)
becomes backbone weights for ``init_cfg=dict(type='Pretrained', checkpoint=DST)``; the
authors' released detectron2 detectors (``.pth`` or ``.pkl``) and mmseg 0.x segmentors
become whole mmdet / mmseg 1.x checkpoints that ``tools/test.py`` evaluates with the config
the tool names. The output is ``{'state_dict': weights, 'meta': ...}``; converting it again
changes nothing. SRC is never written to.
"""
import argparse
import os
import tempfile
from pathlib import Path

import torch

from rest_mm.checkpoint import read_checkpoint, suggest_arch
from rest_mm.conversion import convert_released


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='checkpoint to convert')
    parser.add_argument('dst', help='where to write the converted checkpoint (not SRC)')
    args = parser.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if dst.is_dir():
        parser.error(f'DST {args.dst!r} is a directory; give a file name')
    if src.resolve() == dst.resolve() or (dst.exists() and src.exists()
                                          and os.path.samefile(src, dst)):
        parser.error(f'DST {args.dst!r} is SRC: the conversion drops keys (the classifier, '
                     f'detectron2 buffers), so it never overwrites its source; give another path')
    return args


def _save_atomically(obj, dst: Path):
    """Write to a temporary file beside ``dst`` and rename it, so a failed or interrupted
    save never leaves a truncated checkpoint at ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f'.{dst.name}.', suffix='.tmp')
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    args = parse_args(argv)
    try:
        weights, meta = convert_released(read_checkpoint(args.src))
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f'{args.src}: {error}') from error
    meta = dict(meta, converted_from=Path(args.src).name)
    _save_atomically({'state_dict': weights, 'meta': meta}, Path(args.dst))
    if meta['kind'] == 'backbone':
        fits = suggest_arch(weights)
    else:
        fits = (f'evaluate with `python tools/test.py {meta["config"]} {args.dst}`')
    print(f'{len(weights)} tensors ({meta["kind"]}) written to {args.dst}; {fits}')
    return meta


if __name__ == '__main__':
    main()
