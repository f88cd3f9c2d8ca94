"""Look inside a ResT/ResTV2 backbone: one figure per image, one column per stage.

Rows, over the image: the stage output's L2 energy (before the output norm), its ``PA``
module's gate ``sigmoid(dwconv3x3(x))`` averaged over channels, and one query pixel's
attention over the reduced key map (first block, averaged over heads; v1's head mixing
applied, its instance norm left out so that the map stays a probability distribution).
"""
import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib
import mmcv
import numpy as np
import torch

from rest_mm.cli import errors
from rest_mm.cli.builders import build_standalone_backbone, positive_int
from rest_mm.cli.preflight import refuse_output_over_inputs
from rest_mm.cli.safe_files import atomic_output, check_output_path
from rest_mm.presets import NUM_STAGES, PRESET_NAMES

matplotlib.use('Agg')  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# The normalisation every ResT/ResTv2 release was trained with (ImageNet, RGB).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
STAGE_STRIDES = (4, 8, 16, 32)
# Each panel is PANEL inches wide and at most MAX_PANEL_ASPECT times as tall (at least
# 1/MAX_PANEL_ASPECT): a thin image is stretched to that shape rather than making the
# figure as tall as its aspect ratio (a 5x300 image gave a 1408x63492 px figure).
PANEL, MAX_PANEL_ASPECT = 3.2, 2.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('image', help='the image to look at')
    parser.add_argument('config_or_arch',
                        help=f'a config file or a preset: {", ".join(PRESET_NAMES)}')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='backbone weights (authors\', converted or a whole model\'s)')
    parser.add_argument('--out', required=True, help='the PNG file to write')
    parser.add_argument('--query', nargs=2, type=int, metavar=('X', 'Y'), default=None,
                        help='query pixel in the original image (default: its centre)')
    parser.add_argument('--max-size', type=positive_int, default=1024,
                        help='longer side the image is shrunk to if larger (default 1024); '
                        'the model itself takes any size')
    parser.add_argument('--device', default='cpu', help='e.g. cpu or cuda (default cpu)')
    errors.add_debug_argument(parser)
    return parser.parse_args(argv)


def load_image(path: str, max_size: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """The image as RGB ``uint8``, shrunk so its longer side is at most ``max_size``,
    and its original size ``(width, height)``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f'{path} could not be read: there is no such file')
    image = mmcv.imread(path, channel_order='rgb')
    if image is None:
        raise ValueError(f'{path} could not be read as an image')
    original = (image.shape[1], image.shape[0])
    scale = min(1.0, max_size / max(image.shape[:2]))
    if scale < 1.0:
        image = mmcv.imrescale(image, scale)
    return image, original


def query_in_image(query: Optional[Sequence[int]], original: Tuple[int, int],
                   shown: Tuple[int, int]) -> Tuple[int, int]:
    """The ``--query`` pixel of the original image as a pixel of the shown (shrunk) one.

    Args:
        query (Sequence[int], optional): ``(x, y)`` in the original image; None for its
            centre.
        original (tuple): The original image's ``(width, height)``.
        shown (tuple): The shrunk image's ``(width, height)``. Each side is rounded to
            whole pixels, so the two sides of a thin image shrink by different factors.

    Returns:
        tuple: ``(x, y)`` in the shown image.

    Raises:
        ValueError: when ``query`` lies outside the original image.
    """
    if query is None:
        return shown[0] // 2, shown[1] // 2
    if not all(0 <= q < size for q, size in zip(query, original)):
        raise ValueError(f'--query {query[0]} {query[1]} lies outside the '
                         f'{original[0]}×{original[1]} image (X in 0..{original[0] - 1}, '
                         f'Y in 0..{original[1] - 1})')
    return tuple(min(q * new // old, new - 1) for q, old, new in zip(query, original, shown))


def to_input(image: np.ndarray, device: str) -> torch.Tensor:
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).to(device)


def positional_encodings(model) -> List[torch.nn.Module]:
    """The ``PA`` module of each stage: the stem's, then each patch embedding's."""
    return [model.stem.pos] + [model.stages[i].downsample.pos for i in range(1, NUM_STAGES)]


def attention_probabilities(attn, x: torch.Tensor, query_index=None):
    """The attention probabilities ``attn`` computes for the NHWC input ``x``.

    Args:
        attn (ReducedKVAttention): A block's attention (``EMSA`` or
            ``UpsampledValueAttention``).
        x (Tensor): Its input, already through the block's ``norm1``, ``B×h×w×C``.
        query_index (int, optional): Only this query (a flat index into ``h×w``).

    Returns:
        tuple: probabilities ``B×n×N×N'`` (``N = 1`` with ``query_index``) and the reduced
        key map's size ``(h', w')``. For v1 with ``apply_transform`` the logits are mixed
        across heads by ``transform_conv`` before the softmax, as in the model.
    """
    q, k, _, reduced_hw = attn.query_key_value(x)
    if query_index is not None:
        q = q[:, :, query_index:query_index + 1]
    logits = torch.matmul(q * attn.scale, k.transpose(-2, -1))
    if getattr(attn, 'apply_transform', False):
        logits = attn.transform_conv(logits)  # the 1×1 conv treats heads as channels
    return logits.softmax(dim=-1), reduced_hw


@torch.no_grad()
def inspect(model, x: torch.Tensor, query_pixel: Tuple[int, int]) -> List[Dict[str, np.ndarray]]:
    """Per stage: feature energy, mean PA gate, and the query's attention map.

    Args:
        model (ResT | ResTV2): The backbone, in eval mode.
        x (Tensor): The normalised image ``1×3×H×W``.
        query_pixel (tuple): The query's pixel ``(x, y)`` in ``x``.

    Returns:
        list[dict]: For each stage, ``energy`` (``h×w``), ``gate`` (``h×w``) and
        ``attention`` (``h'×w'``) arrays, and the query's cell ``query`` as ``(row, col)``.
    """
    captured = {}
    hooks = []
    for i, pa in enumerate(positional_encodings(model)):
        hooks.append(pa.register_forward_hook(
            lambda module, args, out, i=i: captured.__setitem__(('gate', i), module.gate(args[0]))))
    for i, stage in enumerate(model.stages):
        hooks.append(stage.blocks[0].register_forward_pre_hook(
            lambda module, args, i=i: captured.__setitem__(('block_input', i), args[0])))
        hooks.append(stage.register_forward_hook(
            lambda module, args, out, i=i: captured.__setitem__(('output', i), out)))
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()

    stages = []
    for i, stage in enumerate(model.stages):
        block = stage.blocks[0]
        block_input = captured[('block_input', i)]
        _, h, w, _ = block_input.shape
        stride = STAGE_STRIDES[i]
        row, col = min(query_pixel[1] // stride, h - 1), min(query_pixel[0] // stride, w - 1)
        probs, (hr, wr) = attention_probabilities(block.attn, block.norm1(block_input),
                                                  query_index=row * w + col)
        stages.append(dict(
            energy=captured[('output', i)][0].norm(dim=-1).cpu().numpy(),
            gate=captured[('gate', i)][0].mean(dim=0).cpu().numpy(),
            attention=probs[0, :, 0].mean(dim=0).view(hr, wr).cpu().numpy(),
            query=(row, col)))
    return stages


def draw(image: np.ndarray, stages: List[dict], query_pixel: Tuple[int, int],
         title: str, out_file: str):
    """Write the figure: a row per quantity, a column per stage, maps over the image."""
    height, width = image.shape[:2]
    extent = (0, width, height, 0)  # every map covers the whole image, whatever its grid
    rows = (('energy', 'feature energy ‖x‖₂', 'inferno'),
            ('gate', 'PA gate σ(dwconv(x)), mean over C', 'viridis'),
            ('attention', 'attention of + over reduced keys', 'magma'))
    aspect = min(max(height / width, 1 / MAX_PANEL_ASPECT), MAX_PANEL_ASPECT)
    figsize = (PANEL * len(stages), PANEL * len(rows) * aspect + 1.2)
    fig, axes = plt.subplots(len(rows), len(stages), squeeze=False, figsize=figsize)
    for r, (key, label, cmap) in enumerate(rows):
        for s, stage in enumerate(stages):
            ax = axes[r][s]
            values = stage[key]
            ax.imshow(image, extent=extent, aspect='auto')  # fills the panel's box
            shown = ax.imshow(values, cmap=cmap, alpha=0.6, extent=extent,
                              interpolation='nearest', aspect='auto')
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(f'stage {s + 1} {label}\n{values.shape[0]}×{values.shape[1]} map, '
                         f'{values.min():.3g}..{values.max():.3g}', fontsize=7)
            if key == 'attention':
                ax.plot(*query_pixel, marker='+', color='cyan', markersize=14, mew=2)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(out_file) as temporary:
        fig.savefig(temporary, dpi=110, format='png')
    plt.close(fig)


@errors.handled
def main(argv=None):
    args = parse_args(argv)
    if not args.out.lower().endswith('.png'):
        raise ValueError(f'--out {args.out}: the figure is written as PNG; name a .png file')
    refuse_output_over_inputs(args.out, {'image': args.image, 'config': args.config_or_arch,
                                         'checkpoint': args.checkpoint}, '--out')
    check_output_path(args.out, 'file', option='--out')
    image, original = load_image(args.image, args.max_size)
    height, width = image.shape[:2]
    query = query_in_image(args.query, original, (width, height))
    model, description = build_standalone_backbone(args.config_or_arch, args.checkpoint)
    model.to(args.device)
    stages = inspect(model, to_input(image, args.device), query)
    draw(image, stages, query,
         f'{description}; input {width}×{height}; query pixel {query}', args.out)
    print(f'{args.out}: {description}, input {width}×{height}')


if __name__ == '__main__':
    main()
