"""Convert an authors' ResT/ResTv2 checkpoint to rest_mm's key names.

The kind is recognised by its keys (:func:`rest_mm.conversion.convert_released`): ImageNet
backbones become backbone weights for ``init_cfg``; the authors' detectron2 detectors and
mmseg 0.x segmentors become whole mmdet / mmseg 1.x checkpoints for ``tools/test.py``.
Converting the output again changes nothing; SRC is never written to, DST atomically.
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
