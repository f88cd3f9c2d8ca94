"""Export a ResT/ResTV2 backbone, or a whole mmseg segmentor, to ONNX with dynamic sizes.

Batch, height and width are dynamic; after writing, the tool checks with onnxruntime that
the file reproduces PyTorch at several sizes (:func:`verify` says within what); it is written
under a temporary name and takes the place of ``--out`` only once it has passed, so a kill,
a full disk or a failed check leaves a previous file there as it was. Detectors
are not exported: their outputs need box decoding and NMS outside the network. The exporter
is torch's TorchScript one (``dynamo=False`` where torch has that switch; opset 17): seconds,
and no extra package.
README, "ONNX export", says more.
"""
import argparse
import copy
import time
import warnings
from functools import partial
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from rest_mm.cli import errors
from rest_mm.cli.builders import build_standalone_backbone, parse_size, positive_float
from rest_mm.cli.checkpoint_checks import load_whole_model
from rest_mm.cli.preflight import refuse_output_over_inputs
from rest_mm.cli.safe_files import atomic_output, check_output_path
from rest_mm.presets import PRESET_NAMES
from rest_mm.torch_compat import onnx_export_torchscript

DEFAULT_SIZES = ((1, 224, 224), (2, 200, 328), (1, 333, 517))
OPSET = 17  # the first with LayerNormalization; SDPA is exported as MatMul/Softmax


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config_or_arch',
                        help=f'a config file or a backbone preset: {", ".join(PRESET_NAMES)}')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='weights: for a backbone any layout the converter accepts, for '
                        '--segmentor a checkpoint of the whole segmentor; default random')
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument('--segmentor', action='store_true',
                        help='export the whole mmseg segmentor of CONFIG, not only its backbone')
    parser.add_argument('--verify-sizes', nargs='+', default=DEFAULT_SIZES, metavar='[Bx]HxW',
                        type=partial(parse_size, batch=True),
                        help='sizes to check with onnxruntime, e.g. 224x224 2x200x328 '
                        '(default: 224x224 2x200x328 333x517)')
    parser.add_argument('--no-verify', action='store_true', help='skip the onnxruntime check')
    parser.add_argument('--atol', type=positive_float, default=1e-4,
                        help='accepted difference from PyTorch where float32 rounding is not '
                        'amplified (default 1e-4; see verify())')
    errors.add_debug_argument(parser)
    return parser.parse_args(argv)


class ExportableAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` written with slices and means, which ONNX can express.

    Bin ``i`` of ``n`` over a side of length ``L`` spans ``[floor(i·L/n), ceil((i+1)·L/n))``,
    PyTorch's own rule, so the result is identical for every input size; the bounds are
    computed from the traced size, so the exported graph stays dynamic. (Ceil is written
    as ``(a + n - 1) // n``: ONNX integer division truncates, which is floor only for
    non-negative operands.)
    """

    def __init__(self, output_size):
        super().__init__()
        size = output_size if isinstance(output_size, Sequence) else (output_size, output_size)
        if None in size:
            raise ValueError('adaptive pooling that keeps a side (None) is not supported')
        self.output_size = tuple(size)

    @staticmethod
    def _bins(length, count: int):
        return [((i * length) // count, ((i + 1) * length + count - 1) // count)
                for i in range(count)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        rows = []
        for top, bottom in self._bins(height, self.output_size[0]):
            band = x[..., top:bottom, :]
            rows.append(torch.cat([band[..., left:right].mean(dim=(-2, -1), keepdim=True)
                                   for left, right in self._bins(width, self.output_size[1])],
                                  dim=-1))
        return torch.cat(rows, dim=-2)


def make_pooling_exportable(model: nn.Module) -> int:
    """Swap every ``AdaptiveAvgPool2d`` in ``model`` in place; returns how many."""
    swapped = 0
    for name, child in model.named_children():
        if isinstance(child, nn.AdaptiveAvgPool2d):
            setattr(model, name, ExportableAdaptiveAvgPool2d(child.output_size))
            swapped += 1
        else:
            swapped += make_pooling_exportable(child)
    return swapped


class SegmentorLogits(nn.Module):
    """An mmseg segmentor's tensor-mode forward as a one-input, one-output module."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.segmentor(image, mode='tensor')


def build_segmentor(config: str, checkpoint) -> Tuple[nn.Module, str]:
    """The config's mmseg ``EncoderDecoder`` in eval mode, SyncBN reverted to BN."""
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope

    if not Path(config).is_file():
        raise FileNotFoundError(f'--segmentor needs an mmseg config file; {config!r} is not '
                                'a file')
    cfg = Config.fromfile(config)
    if cfg.get('default_scope') != 'mmseg' or cfg.model.get('type') != 'EncoderDecoder':
        raise ValueError(f'{config}: --segmentor exports mmseg EncoderDecoder configs; this '
                         f'one has default_scope={cfg.get("default_scope")!r} and model type '
                         f'{cfg.model.get("type")!r}. Detectors are not exported (their '
                         f'outputs need box decoding and NMS outside the network)')
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    cfg.model.pop('pretrained', None)  # a base config's ImageNet URL: never downloaded here
    cfg.model.backbone.pop('init_cfg', None)
    segmentor = revert_sync_batchnorm(MODELS.build(cfg.model))
    description = f'EncoderDecoder with {cfg.model.backbone.type} from {Path(config).name}'
    if checkpoint is None:
        description += ', random weights'
    else:
        load_whole_model(segmentor, checkpoint, f'the segmentor of {config} (a '
                         f'whole-segmentor checkpoint is needed)')
        description += f', weights {Path(checkpoint).name}'
    return segmentor.eval(), description


def export(model: nn.Module, output_names: List[str], out_file: str):
    """Write ``model`` to ``out_file`` with dynamic batch, height and width."""
    example = torch.randn(1, 3, 224, 224)
    dynamic_axes = {'image': {0: 'batch', 2: 'height', 3: 'width'}}
    for name in output_names:
        dynamic_axes[name] = {0: 'batch', 2: f'{name}_height', 3: f'{name}_width'}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo (see the module doc),
        # and traces the backbone's input check, whose channel count is static anyway.
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning,
                                module='rest_mm.rest')
        onnx_export_torchscript(model, (example, ), out_file, opset_version=OPSET,
                                input_names=['image'], output_names=output_names,
                                dynamic_axes=dynamic_axes)


@torch.no_grad()
def verify(model: nn.Module, onnx_file: str, sizes, atol: float) -> List[dict]:
    """Run one ONNX file at every size and compare it with PyTorch.

    The file passes at a size when it is within ``atol + 10 · e32`` of PyTorch's float32
    output, ``e32`` being how far that output itself is from PyTorch's float64 run of the
    same model: a measure of how much the model amplifies float32 rounding at that input.
    For ResTv2 and the segmentors ``e32`` is ~1e-5 and the bound is about ``atol``. ResT
    v1's instance norm over its head-mixed attention divides by the map's standard
    deviation, which is tiny when the attention is nearly uniform (random weights), so
    any two float32 runtimes differ there by ~1e-3; a wrong graph is off by far more.

    Returns:
        list[dict]: per size: ``size``, ``onnx_vs_torch``, ``torch_float32_error``,
        ``tolerance``, ``ok``.
    """
    import onnxruntime as ort
    session = ort.InferenceSession(onnx_file, providers=['CPUExecutionProvider'])
    model_float64 = copy.deepcopy(model).double()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch, height, width in sizes:
        image = torch.randn(batch, 3, height, width, generator=generator)
        expected = model(image)
        expected = expected if isinstance(expected, (tuple, list)) else (expected, )
        exact = model_float64(image.double())
        exact = exact if isinstance(exact, (tuple, list)) else (exact, )
        try:
            got = session.run(None, {'image': image.numpy()})
        except Exception as error:  # onnxruntime raises its own unrelated types
            raise SystemExit(f'the exported graph fails at {batch}x{height}x{width}: {error}. '
                             f'Something in the forward was traced as a constant size.')
        if [g.shape for g in got] != [tuple(e.shape) for e in expected]:
            raise SystemExit(f'{batch}x{height}x{width}: ONNX output shapes '
                             f'{[g.shape for g in got]}, PyTorch '
                             f'{[tuple(e.shape) for e in expected]}')
        onnx_error = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
        float32_error = max(float((e.double() - x).abs().max()) for e, x in zip(expected, exact))
        tolerance = atol + 10 * float32_error
        rows.append(dict(size=(batch, height, width), onnx_vs_torch=onnx_error,
                         torch_float32_error=float32_error, tolerance=tolerance,
                         ok=onnx_error <= tolerance))
    return rows


@errors.handled
def main(argv=None):
    args = parse_args(argv)
    if not args.out.endswith('.onnx'):
        raise ValueError(f'--out {args.out}: name a .onnx file')
    refuse_output_over_inputs(args.out, {'config': args.config_or_arch,
                                         'checkpoint': args.checkpoint}, '--out')
    if args.segmentor:
        segmentor, description = build_segmentor(args.config_or_arch, args.checkpoint)
        swapped = make_pooling_exportable(segmentor)
        model, output_names = SegmentorLogits(segmentor).eval(), ['seg_logits']
        if swapped:
            description += f' ({swapped} adaptive pools made exportable)'
    else:
        model, description = build_standalone_backbone(args.config_or_arch, args.checkpoint)
        output_names = [f'stage{i + 1}' for i in model.out_indices]

    weight_bytes = sum(t.numel() * t.element_size()
                       for t in [*model.parameters(), *model.buffers()])
    # the file holds the weights (float32) and a small graph
    check_output_path(args.out, 'file', needed_bytes=weight_bytes, option='--out')
    # Exported and verified under a temporary name: a kill, a full disk or a failed check
    # leaves the previous file at --out as it was.
    with atomic_output(args.out, 'export ONNX to') as temporary:
        export_and_verify(model, output_names, description, temporary, args, args.verify_sizes)


def export_and_verify(model: nn.Module, output_names: List[str], description: str,
                      out_file: str, args, sizes):
    """Export to ``out_file`` and check it at ``sizes`` (unless ``--no-verify``); the
    messages name ``--out``. A file that fails the check is a ``SystemExit``."""
    start = time.perf_counter()
    export(model, output_names, out_file)
    print(f'{args.out}: {description}; outputs {", ".join(output_names)}; '
          f'exported in {time.perf_counter() - start:.1f} s (opset {OPSET}, dynamic B, H, W)')
    if args.no_verify:
        return
    rows = verify(model, out_file, sizes, args.atol)
    print(f'{"input BxHxW":>14} {"max |onnx - torch|":>19} {"torch fp32 vs fp64":>19} '
          f'{"tolerance":>10}  ok')
    for row in rows:
        size = 'x'.join(map(str, row['size']))
        print(f'{size:>14} {row["onnx_vs_torch"]:>19.2e} {row["torch_float32_error"]:>19.2e} '
              f'{row["tolerance"]:>10.1e}  {"yes" if row["ok"] else "NO"}')
    if not all(row['ok'] for row in rows):
        raise SystemExit(f'the ONNX file does not reproduce PyTorch within the tolerance '
                         f'(--atol {args.atol} plus 10x PyTorch\'s own float32 error), so '
                         f'{args.out} was not written (--no-verify writes it unchecked)')


if __name__ == '__main__':
    main()
