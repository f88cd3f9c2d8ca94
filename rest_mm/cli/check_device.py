"""Check that the backbones compute the right thing on a device: CUDA or the CPU.

Each check compares what the device computes with a float64 run on the CPU of the same
weights and inputs (the straightforward model of rest_mm/testing/straightforward.py, the
attention formula op by op), and prints a table (errors, tolerances, times, peak memory):

* **backbone outputs / gradients**: each preset (``--archs``), forward and backward at a
  detection size (``--size``), in float32 and under autocast (float16 and bfloat16 on CUDA,
  bfloat16 on the CPU); every stage output and every parameter gradient;
* **attention backward**: ResT v1's hand-written backward
  (``rest_mm.fused_attention.MixedHeadAttentionFunction``) against autograd of the plain
  formula ``IN(softmax(mix(q·kᵀ))) @ v``, on the device, at the size of the first stage
  that mixes heads;
* **train**: one training iteration of each toy config (configs/toy/), built as
  ``tools/train.py`` builds it (``--amp`` on CUDA, float32 on the CPU), on a batch of two
  generated toy images. Skipped, with the reason, where mmdet or mmseg is not installed.

Tolerances (:func:`rounding_tolerance`): the plain implementation of the same function,
run on the same device in the same arithmetic (the straightforward model of
rest_mm/testing/straightforward.py, or the attention formula op by op, through autograd),
measures how far rounding alone takes that function from the float64 result on this input,
per tensor: ``e``. Two implementations that differ only in rounding each lie about ``e``
from the exact result, so ours may lie ``RUNS_SLACK * e`` from it (the factor leaves room for
kernels that round worse), plus ``ULPS`` units in the last place of the dtype at the
tensor's largest magnitude, for tensors whose measured ``e`` happens to be near zero. The
same rule as the float32 tolerance of the tests (tests/conftest.py), with the error
measured in the arithmetic under test instead of assumed: it adapts to the dtype, to the
device's kernels (TF32 convolutions included) and to how well the function is conditioned
on this input, and a check fails when ours is much less accurate than the plain formula
run the same way, not when the plain formula itself is inaccurate.

Example::

    python tools/check_device.py --device cuda --json device_check.json
    python tools/check_device.py --device cpu --size 128x192 --checks backbone attention

Exit status: 0 when every check that ran passed, 1 when one failed, 2 on bad usage
(``--device cuda`` without CUDA included).
"""
import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from rest_mm import rest
from rest_mm.cli import errors
from rest_mm.cli.benchmark import _peak_rss_bytes, _reset_peak_rss, _rss_bytes
from rest_mm.cli.builders import parse_size
from rest_mm.cli.precision import cpu_bf16_note
from rest_mm.cli.safe_files import OutputError, atomic_open, check_output_path
from rest_mm.fused_attention import MixedHeadAttentionFunction, mixed_head_attention
from rest_mm.presets import ARCH_ZOOS, PRESET_NAMES, parse_preset_name
from rest_mm.rest import BACKBONES, EMSA, ResT
from rest_mm.testing import straightforward
from rest_mm.weights import convert_checkpoint

REPO = Path(__file__).resolve().parents[2]
TOY_CONFIG_DIR = REPO / 'configs' / 'toy'
CHECKS = ('backbone', 'attention', 'train')
DEFAULT_ARCHS = ('rest_small', 'restv2_tiny')
DEFAULT_SIZE = (800, 1344)
TRAIN_BATCH = 2  # toy images in the one training iteration of each toy config

# Ours may lie RUNS_SLACK times as far from the exact result as the plain implementation in
# the same arithmetic, plus ULPS units in the last place (module docstring). Two runs of one
# function by different kernels each lie within about one such error e of the exact result,
# so they differ by about 2e; the factor 4 on top leaves room for kernels that round worse,
# and the ULP term bounds outputs whose measured e happens to be near zero. The tests'
# float32 tolerances (tests/conftest.py) use the same rule.
RUNS_SLACK = 8
ULPS = 16


def rounding_tolerance(plain_error: float, magnitude: float, dtype: torch.dtype) -> float:
    """How far from the exact (float64) result a tensor may lie when it differs from a
    plain implementation of the same function by rounding alone.

    Args:
        plain_error (float): The largest difference between the plain implementation's
            result, computed in the same arithmetic (device, dtype), and the exact one.
        magnitude (float): The exact result's largest absolute value.
        dtype (torch.dtype): The dtype the computation rounds to (the autocast dtype, or
            float32).

    Returns:
        float: ``RUNS_SLACK * plain_error + ULPS * eps(dtype) * magnitude``.
    """
    return RUNS_SLACK * plain_error + ULPS * torch.finfo(dtype).eps * magnitude


@dataclasses.dataclass
class Row:
    """One line of the table; ``passed`` is None for a skipped check."""
    check: str
    dtype: str
    max_error: Optional[float] = None
    tolerance: Optional[float] = None
    passed: Optional[bool] = None
    seconds: Optional[float] = None
    peak_mib: Optional[float] = None
    note: str = ''


# ---------------------------------------------------------------------------------------
# Measuring: time and peak memory of one call on the device.
# ---------------------------------------------------------------------------------------
class Meter:
    """Times a block and measures its peak memory on ``device``: on CUDA
    ``torch.cuda.max_memory_allocated`` over the block (everything allocated, weights
    included); on the CPU the growth of the process's peak resident set size during the
    block (Linux ``VmHWM``, its counter reset before the block where the kernel allows,
    else the growth beyond the process's earlier peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = self.peak_mib = None
        self._start = self._rss_before = None

    def start(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss_before = _rss_bytes()
            _reset_peak_rss()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mib = max(0, _peak_rss_bytes() - self._rss_before) / 2**20
        self.seconds = time.perf_counter() - self._start

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        self.start()
        yield
        self.stop()


def memory_note(device: torch.device) -> str:
    """What the peak memory column means on ``device``."""
    if device.type == 'cuda':
        return 'torch.cuda.max_memory_allocated during the call (weights included)'
    return 'growth of the process peak RSS (VmHWM) during the call'


# ---------------------------------------------------------------------------------------
# Comparing tensors with the float64 result.
# ---------------------------------------------------------------------------------------
def compare(name: str, dtype_name: str, dtype: torch.dtype, ours: Dict[str, torch.Tensor],
            plain: Dict[str, torch.Tensor], exact: Dict[str, torch.Tensor],
            meter: Meter) -> Row:
    """A row for tensors ``ours`` (the device's), with tolerances from ``plain`` (the plain
    implementation, same device and dtype), both against ``exact`` (float64, CPU). The row
    shows the tensor closest to its tolerance (largest error over tolerance)."""
    worst, problems = None, []
    for key, reference in exact.items():
        if key not in ours or key not in plain:
            problems.append(f'{key} missing')
            continue
        mine, theirs = ours[key].double().cpu(), plain[key].double().cpu()
        if mine.shape != reference.shape:
            problems.append(f'{key} shape {tuple(mine.shape)} != {tuple(reference.shape)}')
            continue
        if not torch.isfinite(mine).all():
            problems.append(f'{key} not finite')
            continue
        error = (mine - reference).abs().max().item() if mine.numel() else 0.
        plain_error = (theirs - reference).abs().max().item() if theirs.numel() else 0.
        if not torch.isfinite(theirs).all():
            plain_error = float('inf')  # the plain formula overflowed: no bound from it
        magnitude = reference.abs().max().item() if reference.numel() else 0.
        tolerance = rounding_tolerance(plain_error, magnitude, dtype)
        ratio = error / tolerance if tolerance > 0 else (0. if error == 0 else float('inf'))
        if worst is None or ratio > worst[0]:
            worst = (ratio, key, error, tolerance)
    row = Row(name, dtype_name, seconds=meter.seconds, peak_mib=meter.peak_mib)
    if worst is not None:
        ratio, key, row.max_error, row.tolerance = worst
        row.note = f'worst: {key} ({len(exact)} tensors)'
    row.passed = not problems and worst is not None and worst[0] <= 1
    if problems:
        row.note = '; '.join(problems[:3]) + (f' (+{len(problems) - 3} more)'
                                                if len(problems) > 3 else '')
    return row


# ---------------------------------------------------------------------------------------
# The backbones.
# ---------------------------------------------------------------------------------------
class PlainWithOutputNorms(nn.Module):
    """The straightforward model with copies of ours' fresh output norms (the LayerNorms
    that the ImageNet model lacks) applied to its stage maps: one function with ours, each
    parameter with its counterpart."""

    def __init__(self, plain: nn.Module, ours: nn.Module):
        super().__init__()
        self.plain = plain
        self.norms = nn.ModuleDict({f'norm{i}': copy.deepcopy(getattr(ours, f'norm{i}'))
                                    for i in ours.fresh_norm_indices})

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        maps = self.plain(x)
        return [self.norms[f'norm{i}'](m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                if f'norm{i}' in self.norms else m for i, m in enumerate(maps)]

    @staticmethod
    def our_names(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Its parameters' tensors (e.g. gradients) under ours' names."""
        plain = {k[len('plain.'):]: v for k, v in tensors.items() if k.startswith('plain.')}
        renamed = dict(convert_checkpoint(plain))  # the authors' names, values untouched
        renamed.update({k[len('norms.'):]: v for k, v in tensors.items()
                        if k.startswith('norms.')})
        return renamed


def build_pair(name: str) -> Tuple[nn.Module, nn.Module]:
    """Ours and the straightforward model (:class:`PlainWithOutputNorms`) of preset
    ``name`` with the same random weights: one function (the tests prove ours equal to the
    straightforward model), every parameter of ours with its counterpart. Both in train
    mode."""
    model_name, arch = parse_preset_name(name)
    torch.manual_seed(0)
    plain = straightforward.build(name)
    ours = BACKBONES[model_name](arch=arch)
    missing, unexpected = ours.load_state_dict(convert_checkpoint(plain.state_dict()),
                                               strict=False)
    fresh = {f'norm{i}.{p}' for i in ours.fresh_norm_indices for p in ('weight', 'bias')}
    if unexpected or not set(missing) <= fresh:
        raise RuntimeError(f'{name}: the straightforward model\'s weights do not fit ours '
                           f'(missing {missing}, unexpected {unexpected})')
    with torch.no_grad():  # output norms far from the identity, so that they count
        for norm in (getattr(ours, f'norm{i}') for i in ours.fresh_norm_indices):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return ours.train(), PlainWithOutputNorms(plain, ours).train()


def output_shapes(name: str, size: Tuple[int, int]) -> List[Tuple[int, ...]]:
    """The four stage outputs' shapes for one image of ``size``: every downsampling is a
    stride-2 convolution with padding 1 (two in the stem), ``ceil(side / 2)`` each."""
    model_name, arch = parse_preset_name(name)
    height, width = size
    shapes = []
    for i, channels in enumerate(ARCH_ZOOS[model_name][arch]['embed_dims']):
        for _ in range(2 if i == 0 else 1):
            height, width = -(-height // 2), -(-width // 2)
        shapes.append((1, channels, height, width))
    return shapes


@contextlib.contextmanager
def attention_through_autograd() -> Iterator[None]:
    """Within the block, ResT v1's attention is differentiated by autograd through
    :func:`rest_mm.fused_attention.mixed_head_attention` instead of the hand-written
    backward of :class:`MixedHeadAttentionFunction`."""

    class ByAutograd:
        @staticmethod
        def apply(q, k, v, mix, rows, drop, eps):
            return mixed_head_attention(q, k, v, mix, rows, drop, eps)[0]

    original = rest.MixedHeadAttentionFunction
    rest.MixedHeadAttentionFunction = ByAutograd
    try:
        yield
    finally:
        rest.MixedHeadAttentionFunction = original


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device``; none for float32 and float64."""
    enabled = dtype not in (torch.float32, torch.float64)
    return torch.autocast(device.type, dtype=dtype if enabled else None, enabled=enabled)


def forward_backward(model: nn.Module, x: torch.Tensor, cotangents: Sequence[torch.Tensor],
                     dtype: torch.dtype, grad_names: Callable[[Dict], Dict]) -> Dict:
    """Outputs (``out0``..) and parameter gradients (``grad.<our name>``) of one forward
    (under autocast for a low-precision ``dtype``) and backward of ``Σ⟨out_i, cot_i⟩``."""
    model.zero_grad(set_to_none=True)
    with autocast(x.device, dtype):
        outputs = model(x)
    torch.autograd.backward(list(outputs), [c.to(o.dtype) for c, o in zip(cotangents, outputs)])
    grads = grad_names({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    result = {f'out{i}': o.detach() for i, o in enumerate(outputs)}
    result.update({f'grad.{k}': g for k, g in grads.items()})
    return result


DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
#: What each device is checked in by default: CUDA trains in float16 (``--amp``) or
#: bfloat16, CPUs autocast to bfloat16 only.
DEVICE_DTYPES = {'cuda': ('float32', 'float16', 'bfloat16'), 'cpu': ('float32', 'bfloat16')}


def arithmetic(device: torch.device, names: Sequence[str]) -> List[Tuple[str, torch.dtype, str]]:
    """``(label, dtype, reason to skip or '')`` for the dtypes ``names`` on ``device``."""
    result = []
    for name in names:
        skip = ''
        if name == 'bfloat16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
            skip = 'this GPU has no bfloat16'
        label = name if name == 'float32' else f'autocast {name}'
        result.append((label, DTYPES[name], skip))
    return result


def check_backbone(name: str, size: Tuple[int, int], device: torch.device,
                   dtypes: Sequence[str], log: Callable[[str], None]) -> List[Row]:
    """Rows ``<name> outputs`` and ``<name> gradients`` for every dtype of the device."""
    ours, plain = build_pair(name)
    torch.manual_seed(1)
    x = torch.randn(1, 3, *size)
    log(f'{name}: float64 reference on the CPU at {size[0]}x{size[1]}')
    cotangents = [torch.randn(shape, dtype=torch.float64) for shape in output_shapes(name, size)]
    same = dict  # ours' gradients are under our names already
    plain_names = PlainWithOutputNorms.our_names
    exact = forward_backward(copy.deepcopy(ours).double(), x.double(), cotangents,
                             torch.float64, same)
    # v1's head-mixing bias is frozen in ours (its gradient is exactly zero)
    frozen = {f'grad.{k}' for k, p in ours.named_parameters() if not p.requires_grad}
    exact = {k: v for k, v in exact.items() if k not in frozen}
    ours, plain, x = ours.to(device), plain.to(device), x.to(device)
    cotangents = [c.float().to(device) for c in cotangents]
    if device.type == 'cuda':  # lazy initialisation (context, libraries) outside the timing
        with torch.no_grad():
            ours(x)
    rows = []
    for label, dtype, skip in arithmetic(device, dtypes):
        if skip:
            rows += [Row(f'{name} {what}', label, note=f'skipped: {skip}')
                     for what in ('outputs', 'gradients')]
            continue
        log(f'{name}: {label} on {device}')
        meter = Meter(device)
        with meter.measure():
            mine = forward_backward(ours, x, cotangents, dtype, same)
        theirs = forward_backward(plain, x, cotangents, dtype, plain_names)
        if isinstance(ours, ResT):
            # The straightforward model's v1 gradients disagree with finite differences
            # (and with ours, which agree); v1's gradients are bounded by ours with the
            # attention differentiated by autograd instead of the hand-written backward.
            with attention_through_autograd():
                by_autograd = forward_backward(ours, x, cotangents, dtype, same)
            theirs.update({k: v for k, v in by_autograd.items() if k.startswith('grad.')})
        for what, prefix in (('outputs', 'out'), ('gradients', 'grad.')):
            keys = [k for k in exact if k.startswith(prefix)]
            rows.append(compare(f'{name} {what}', label, dtype, mine, theirs,
                                {k: exact[k] for k in keys}, meter))
        del mine, theirs
    return rows


# ---------------------------------------------------------------------------------------
# v1's hand-written attention backward.
# ---------------------------------------------------------------------------------------
def plain_attention(q, k, v, mix, eps):
    """``IN(softmax(mix(q·kᵀ))) @ v`` op by op, as the paper writes it (the map
    materialised, an instance norm over each head's ``N×N'`` map)."""
    logits = torch.matmul(q, k.transpose(-2, -1))
    mixed = torch.einsum('ij,bjnm->binm', mix, logits)
    return torch.matmul(F.instance_norm(mixed.softmax(dim=-1), eps=eps), v)


def attention_inputs(name: str, size: Tuple[int, int]):
    """``(q, k, v, mix, rows, eps)`` at the size and shape of the first attention of
    preset ``name`` that mixes heads, or None where none does (v2)."""
    model_name, arch = parse_preset_name(name)
    if model_name != 'ResT':
        return None
    torch.manual_seed(0)
    model = BACKBONES[model_name](arch=arch)
    for i, stage in enumerate(model.stages):
        attn = stage.blocks[0].attn
        if isinstance(attn, EMSA) and attn.apply_transform:
            stride = 4 * 2 ** i
            h, w = -(-size[0] // stride), -(-size[1] // stride)
            hr, wr = -(-h // attn.sr_ratio), -(-w // attn.sr_ratio)
            n, d = attn.num_heads, attn.head_dim
            torch.manual_seed(2)
            q = torch.randn(1, n, h * w, d)
            k, v = torch.randn(1, n, hr * wr, d), torch.randn(1, n, hr * wr, d)
            mix = attn.transform_conv.weight.detach().view(n, n) * attn.scale
            rows = max(1, attn.map_block_elements // (n * hr * wr))
            return q, k, v, mix, rows, attn.instance_norm_eps
    return None


def attention_gradients(function, inputs, grad_out, dtype) -> Dict[str, torch.Tensor]:
    """The output and the gradients of ``q, k, v, mix`` of one call under ``dtype``."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with autocast(leaves[0].device, dtype):
        out = function(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    result = dict(out=out.detach())
    result.update({f'grad.{n}': g for n, g in zip(('q', 'k', 'v', 'mix'), grads)})
    return result


def check_attention(name: str, size: Tuple[int, int], device: torch.device,
                    dtypes: Sequence[str], log: Callable[[str], None]) -> List[Row]:
    """Rows ``<name> attention backward``: the hand-written backward on the device against
    autograd of :func:`plain_attention` on the device, both against float64 on the CPU."""
    found = attention_inputs(name, size)
    if found is None:
        return []
    *inputs, rows, eps = found
    torch.manual_seed(3)
    grad_out = torch.randn(inputs[0].shape, dtype=torch.float64)
    log(f'{name} attention: float64 reference on the CPU, q {tuple(inputs[0].shape)}, '
        f'k {tuple(inputs[1].shape)}')
    exact = attention_gradients(lambda *t: plain_attention(*t, eps),
                                [t.double() for t in inputs], grad_out, torch.float64)
    inputs, grad_out = [t.to(device) for t in inputs], grad_out.float().to(device)
    result = []
    for label, dtype, skip in arithmetic(device, dtypes):
        if skip:
            result.append(Row(f'{name} attention backward', label, note=f'skipped: {skip}'))
            continue
        log(f'{name} attention: {label} on {device}')
        meter = Meter(device)
        with meter.measure():
            ours = attention_gradients(
                lambda *t: MixedHeadAttentionFunction.apply(*t, rows, 0., eps), inputs,
                grad_out, dtype)
        plain = attention_gradients(lambda *t: plain_attention(*t, eps), inputs, grad_out,
                                    dtype)
        result.append(compare(f'{name} attention backward', label, dtype, ours, plain, exact,
                              meter))
    return result


# ---------------------------------------------------------------------------------------
# One training iteration of each toy config.
# ---------------------------------------------------------------------------------------
def missing_libraries() -> List[str]:
    """The OpenMMLab libraries the toy configs need that are not installed."""
    return [name for name in ('mmdet', 'mmseg') if importlib.util.find_spec(name) is None]


def toy_configs() -> List[Path]:
    return sorted(TOY_CONFIG_DIR.glob('*.py'))


def _data_options(scope: str, data: Dict[str, str]) -> List[str]:
    """``--cfg-options`` values that point a toy config of ``scope`` at generated data."""
    root = os.path.join(data['coco' if scope == 'mmdet' else 'ade'], '')
    options = [f'{split}_dataloader.dataset.data_root={root}' for split in ('train', 'val',
                                                                            'test')]
    if scope == 'mmdet':
        annotations = os.path.join(root, 'annotations', 'instances_val.json')
        options += [f'{split}_evaluator.ann_file={annotations}' for split in ('val', 'test')]
    return options


def train_one_iteration(config: Path, data: Dict[str, str], work_dir: str,
                        device: torch.device) -> Row:
    """One iteration of ``config`` configured as ``tools/train.py`` configures it (``--amp``
    on CUDA), on a batch of ``TRAIN_BATCH`` toy images, its evaluation and checkpoints left
    out. Passes when the loss and the updated parameters are finite."""
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.registry import RUNNERS, init_default_scope
    from mmengine.runner import Runner

    from rest_mm.cli import train
    from rest_mm.weights.files import allow_mmengine_checkpoints

    scope = Config.fromfile(str(config)).default_scope
    argv = [str(config), '--work-dir', work_dir, '--cfg-options',
            *_data_options(scope, data)] + (['--amp'] if device.type == 'cuda' else [])
    allow_mmengine_checkpoints()
    cfg = train.build_config(train.parse_args(argv))
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1)
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator', 'test_dataloader', 'test_cfg',
                'test_evaluator'):
        cfg[key] = None
    cfg.default_hooks.checkpoint = None
    cfg.train_dataloader.batch_size = TRAIN_BATCH
    cfg.log_level = 'WARNING'  # the table, not the Runner's start-up log

    meter = Meter(device)
    seen = {}

    class IterationMeter(Hook):
        def before_train_iter(self, runner, batch_idx, data_batch=None):
            meter.start()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            meter.stop()
            seen['outputs'] = outputs

    if 'runner_type' in cfg:
        init_default_scope(cfg.default_scope)
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    runner.register_hook(IterationMeter(), priority='VERY_LOW')
    runner.train()
    label = 'amp float16' if device.type == 'cuda' else 'float32'
    loss = seen.get('outputs', {}).get('loss')
    loss = None if loss is None else float(loss)
    params_finite = all(torch.isfinite(p).all() for p in runner.model.parameters())
    passed = loss is not None and bool(torch.isfinite(torch.tensor(loss))) and params_finite
    note = f'loss {loss:.4g}' if loss is not None else 'no loss logged'
    if not params_finite:
        note += ', parameters not finite after the step'
    return Row(f'train {config.stem}', label, passed=passed, seconds=meter.seconds,
               peak_mib=meter.peak_mib, note=note)


def check_training(device: torch.device, log: Callable[[str], None]) -> List[Row]:
    """A row per toy config: one training iteration, or skipped with the reason."""
    label = 'amp float16' if device.type == 'cuda' else 'float32'
    missing = missing_libraries()
    if missing:
        return [Row(f'train {config.stem}', label,
                    note=f'skipped: {" and ".join(missing)} not installed (library-only env)')
                for config in toy_configs()]
    from rest_mm.cli.toy_data import ToyDataSpec, generate_toy_datasets
    rows = []
    with tempfile.TemporaryDirectory(prefix='rest_mm_check_device_') as folder:
        data = generate_toy_datasets(os.path.join(folder, 'data'),
                                     ToyDataSpec(num_train=TRAIN_BATCH, num_val=1, seed=5))
        for config in toy_configs():
            log(f'train {config.stem}: one iteration on {device}')
            rows.append(train_one_iteration(config, data, os.path.join(folder, config.stem),
                                            device))
    return rows


# ---------------------------------------------------------------------------------------
# The table and the command line.
# ---------------------------------------------------------------------------------------
def _number(value: Optional[float], form: str) -> str:
    return '-' if value is None else format(value, form)


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ['| check | dtype | max error | tolerance | result | time s | peak MiB | note |',
             '|---|---|---|---|---|---|---|---|']
    for row in rows:
        result = 'skip' if row.passed is None else ('pass' if row.passed else 'FAIL')
        lines.append(f'| {row.check} | {row.dtype} | {_number(row.max_error, ".2e")} | '
                     f'{_number(row.tolerance, ".2e")} | {result} | '
                     f'{_number(row.seconds, ".3f")} | {_number(row.peak_mib, ".0f")} | '
                     f'{row.note} |')
    return '\n'.join(lines)


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (:func:`rest_mm.cli.safe_files.atomic_open`),
    so that a reader never sees half a file."""
    with atomic_open(path) as f:
        json.dump(payload, f, indent=1)


def describe_environment(device: torch.device) -> str:
    text = f'torch {torch.__version__}, device {device}'
    if device.type == 'cuda':
        text += (f' ({torch.cuda.get_device_name(device)}; TF32 matmul '
                 f'{"on" if torch.backends.cuda.matmul.allow_tf32 else "off"}, cuDNN conv '
                 f'{"on" if torch.backends.cudnn.allow_tf32 else "off"})')
    else:
        text += f' ({torch.get_num_threads()} threads; {cpu_bf16_note()})'
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n', 1)[1])
    parser.add_argument('--device', choices=('cuda', 'cpu'),
                        default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='where to run the checks (default: cuda where available)')
    parser.add_argument('--archs', nargs='+', default=list(DEFAULT_ARCHS), metavar='PRESET',
                        help=f'presets to check (default: {" ".join(DEFAULT_ARCHS)}); one '
                        f'of {", ".join(PRESET_NAMES)}')
    parser.add_argument('--size', type=parse_size, default=DEFAULT_SIZE,
                        help='input size HxW of the backbone and attention checks '
                        f'(default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})')
    parser.add_argument('--dtypes', nargs='+', choices=list(DTYPES),
                        help='arithmetic of the backbone and attention checks (default: '
                        + '; '.join(f'{device} {" ".join(names)}'
                                    for device, names in DEVICE_DTYPES.items()) + ')')
    parser.add_argument('--checks', nargs='+', choices=CHECKS, default=list(CHECKS),
                        help='which groups of checks to run (default: all)')
    parser.add_argument('--json', metavar='PATH', help='also write the rows to this file')
    errors.add_debug_argument(parser)
    args = parser.parse_args(argv)
    unknown = [name for name in args.archs if name.lower() not in PRESET_NAMES]
    if unknown:
        parser.error(f'--archs: unknown preset(s) {", ".join(unknown)}; the presets are '
                     f'{", ".join(PRESET_NAMES)}')
    smallest = -(-args.size[0] // 32) * -(-args.size[1] // 32)
    if smallest < 2:
        parser.error(f'--size {args.size[0]}x{args.size[1]}: the last stage (stride 32) would '
                     f'be 1x1, and batch norm in training needs more than one value per '
                     f'channel; give at least 33 pixels on one side (e.g. 32x48)')
    if args.dtypes is None:
        args.dtypes = list(DEVICE_DTYPES[args.device])
    refused = [name for name in args.dtypes if name not in DEVICE_DTYPES[args.device]]
    if refused:
        parser.error(f'--dtypes {" ".join(refused)}: not checked on {args.device}, which is '
                     f'checked in {", ".join(DEVICE_DTYPES[args.device])} (CPU autocast '
                     f'computes in bfloat16)')
    # (a folder that is a file is check_output_path's, below)
    if args.json and not os.path.exists(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f'--json {args.json}: its folder does not exist')
    if args.json:  # before the checks: a read-only folder, or a folder named like the file
        try:
            check_output_path(args.json, 'file', option='--json')
        except OutputError as error:
            parser.error(str(error))
    return args


def run_checks(args, log: Callable[[str], None]) -> List[Row]:
    device = torch.device(args.device)
    rows = []
    for name in args.archs:
        if 'backbone' in args.checks:
            rows += check_backbone(name.lower(), args.size, device, args.dtypes, log)
        if 'attention' in args.checks:
            rows += check_attention(name.lower(), args.size, device, args.dtypes, log)
    if 'train' in args.checks:
        rows += check_training(device, log)
    return rows


@errors.handled
def main(argv=None):
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device cuda, but CUDA is not available (torch '
                         f'{torch.__version__}, CUDA build: {torch.version.cuda or "no"}); '
                         f'run with --device cpu')

    def log(message):
        print(message, file=sys.stderr, flush=True)

    device = torch.device(args.device)
    rows = run_checks(args, log)
    header = (f'# {describe_environment(device)}, size {args.size[0]}x{args.size[1]}; '
              f'peak memory: {memory_note(device)}')
    print(header)
    print(format_table(rows))
    failed = [row.check + ' ' + row.dtype for row in rows if row.passed is False]
    print(f'{len(rows) - len(failed)} of {len(rows)} checks passed or skipped'
          + (f'; FAILED: {", ".join(failed)}' if failed else ''))
    if args.json:
        write_json(args.json, dict(environment=describe_environment(device),
                                   size=list(args.size), memory=memory_note(device),
                                   rows=[dataclasses.asdict(row) for row in rows]))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
