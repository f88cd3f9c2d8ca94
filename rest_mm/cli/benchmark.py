"""Latency, throughput and peak memory of backbones or whole models.

Models are named on the command line:

* ours: ``rest_{lite,small,base,large}``, ``restv2_{tiny,small,base,large}``;
* the straightforward implementation (rest_mm/testing/straightforward.py) of the same:
  ``straightforward_rest_small``, ``straightforward_restv2_tiny``, ...;
* mmdet's peers: ``pvt_small`` (PVT-S), ``pvtv2_b1`` (PVTv2-B1), ``swin_tiny`` (Swin-T);
* a config file (``configs/detection/....py``): the whole model in ``tensor`` mode
  (backbone, neck and heads; no post-processing).

Examples::

    # ours against the straightforward implementation and mmdet's peers, one process
    python tools/benchmark.py --compare --size 800x1344 --threads 2 --memory
    # training step (forward + backward) of ResT-S, 2×3×512×512
    python tools/benchmark.py rest_small straightforward_rest_small --compare \\
        --size 512x512 --batch 2 --mode train
    # latency against input size, drawn to a PNG
    python tools/benchmark.py rest_small swin_tiny --size 320x320 512x512 800x1344 \\
        --plot latency.png

Timing: each measurement is the median wall-clock time of ``--runs`` calls after
``--warmup`` calls. With ``--compare`` the models take turns, one call each per round, so
that load from other processes on a shared machine hits them all alike. Ratios are
latency divided by the first model's latency.

Memory (``--memory``): the growth of the process's peak resident set size during one
call, in a fresh subprocess per model and size (model built, input made, peak counter
reset, one call). It counts everything the call allocates on the CPU heap (activations,
temporaries, autograd buffers), not the weights.
"""
import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from rest_mm.cli.builders import build_config_model, build_ours, data_samples, parse_size
from rest_mm.cli.runtime import refuse_output_over_inputs
from rest_mm.presets import PRESET_NAMES
from rest_mm.testing import straightforward

STRAIGHTFORWARD_PREFIX = 'straightforward_'
PEERS = {
    'pvt_small': dict(type='PyramidVisionTransformer', num_layers=[3, 4, 6, 3]),
    'pvtv2_b1': dict(type='PyramidVisionTransformerV2', embed_dims=64, num_layers=[2, 2, 2, 2]),
    'swin_tiny': dict(type='SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
                      num_heads=[3, 6, 12, 24], window_size=7),
}
DEFAULT_COMPARISON = ['rest_small', 'straightforward_rest_small', 'restv2_tiny',
                      'straightforward_restv2_tiny', 'pvt_small', 'pvtv2_b1', 'swin_tiny']


def known_names() -> List[str]:
    return list(PRESET_NAMES) + [STRAIGHTFORWARD_PREFIX + n for n in PRESET_NAMES] + list(PEERS)


def build_model(name: str) -> nn.Module:
    """A model by benchmark name or config path, with seeded random weights."""
    torch.manual_seed(0)
    if name.endswith('.py'):
        if not Path(name).is_file():
            raise FileNotFoundError(f'config {name!r} does not exist')
        return build_config_model(name)
    if name in PRESET_NAMES:
        return build_ours(name)
    if name.startswith(STRAIGHTFORWARD_PREFIX) and \
            name[len(STRAIGHTFORWARD_PREFIX):] in PRESET_NAMES:
        return straightforward.build(name[len(STRAIGHTFORWARD_PREFIX):])
    if name in PEERS:
        from mmdet.registry import MODELS
        from mmengine.registry import init_default_scope
        init_default_scope('mmdet')
        return MODELS.build(dict(PEERS[name]))
    raise KeyError(f'unknown model {name!r}: give a config file (.py) or one of {known_names()}')


def make_step(model: nn.Module, batch: int, size: Tuple[int, int],
              mode: str) -> Callable[[], None]:
    """One inference call (``forward``) or one training step's forward and backward."""
    images = torch.randn(batch, 3, *size)
    samples = data_samples(model, batch, size)

    def run(m):
        if samples is None:
            return m(images)
        return m(images, samples, mode='tensor')

    if mode == 'forward':
        model.eval()

        def step():
            with torch.no_grad():
                run(model)
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            outputs = _tensors(run(model))
            sum(o.float().mean() for o in outputs).backward()
    return step


def _tensors(outputs) -> List[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    flat = []
    for item in outputs:
        flat.extend(_tensors(item))
    return flat


def time_models(steps: Dict[str, Callable[[], None]], warmup: int, runs: int,
                interleave: bool, log: Callable[[str], None]) -> Dict[str, List[float]]:
    """Wall-clock seconds of each step's calls after warm-up; interleaved if asked."""
    times = {name: [] for name in steps}
    for name, step in steps.items():
        for i in range(warmup):
            log(f'  warm-up {name} ({i + 1}/{warmup})')
            step()
    order = ([[name for name in steps]] * runs if interleave else
             [[name] for name in steps for _ in range(runs)])
    for round_names in order:
        for name in round_names:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
            log(f'  {name}: run {len(times[name])}/{runs} {times[name][-1]:.3f} s')
    return times


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where unsupported."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe_memory(name: str, batch: int, size: Tuple[int, int], mode: str) -> dict:
    """Peak RSS growth of one call, in this (fresh) process."""
    step = make_step(build_model(name), batch, size, mode)
    gc.collect()
    before = _rss_bytes()
    exact = _reset_peak_rss()
    step()
    return dict(peak_bytes=_peak_rss_bytes() - before, exact=exact)


def measure_memory(name: str, args, size: Tuple[int, int]) -> float:
    """Peak memory growth in MiB, measured in a subprocess."""
    command = [sys.executable, '-c', 'from rest_mm.cli.benchmark import main; main()', name,
               '--probe-memory', '--size', f'{size[0]}x{size[1]}', '--batch', str(args.batch),
               '--mode', args.mode]
    if args.threads:
        command += ['--threads', str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f'memory probe for {name} failed:\n{result.stderr[-2000:]}')
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report['peak_bytes'] / 2**20


def straightforward_difference(ours: nn.Module, straightforward: nn.Module,
                               size: Tuple[int, int]) -> Tuple[float, float]:
    """Load the straightforward model's weights into ours; the largest output difference
    in float64 (where rounding cannot hide a different function) and in float32.

    The check runs at most at 128×192, where float64 is affordable: the function is the
    same at every size.
    """
    from rest_mm import convert_checkpoint
    from rest_mm.checkpoint import load_converted_state_dict
    load_converted_state_dict(ours, convert_checkpoint(straightforward.state_dict()))
    size = (min(size[0], 128), min(size[1], 192))
    x = torch.randn(1, 3, *size)
    worst = []
    for dtype in (torch.float64, torch.float32):
        ours.to(dtype).eval(), straightforward.to(dtype).eval()
        with torch.no_grad():
            mine, theirs = ours(x.to(dtype)), straightforward(x.to(dtype))
        difference = 0.
        for i, out in zip(ours.out_indices, mine):
            expected = theirs[i]
            if i in ours.fresh_norm_indices:  # ours adds output norms the classifier lacks
                norm = getattr(ours, f'norm{i}')
                expected = norm(expected.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            difference = max(difference, (out - expected).abs().max().item())
        worst.append(difference)
    return tuple(worst)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n', 1)[1])
    parser.add_argument('models', nargs='*',
                        help='benchmark names or config files (default with --compare: '
                        + ' '.join(DEFAULT_COMPARISON) + ')')
    parser.add_argument('--size', type=parse_size, nargs='+', default=[(800, 1344)],
                        help='input sizes HxW (default 800x1344)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--mode', choices=('forward', 'train'), default='forward',
                        help='inference, or a training step (forward + backward)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads (default: torch\'s choice)')
    parser.add_argument('--compare', action='store_true',
                        help='interleave the models\' runs in one process and print ratios')
    parser.add_argument('--memory', action='store_true',
                        help='also measure peak memory growth of one call (subprocess each)')
    parser.add_argument('--plot', metavar='PNG', help='draw latency against input size')
    parser.add_argument('--probe-memory', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.models:
        if not args.compare:
            parser.error('name at least one model, or use --compare for the default set')
        args.models = list(DEFAULT_COMPARISON)
    if args.batch < 1 or args.runs < 1 or args.warmup < 0:
        parser.error('--batch and --runs must be at least 1, --warmup at least 0')
    for name in args.models:
        if not name.endswith('.py') and name not in known_names():
            parser.error(f'unknown model {name!r}: give a config file (.py) or one of '
                         f'{", ".join(known_names())}')
    try:
        refuse_output_over_inputs(args.plot, {f'config {name}': name for name in args.models
                                              if name.endswith('.py')}, '--plot')
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_memory:
        print(json.dumps(probe_memory(args.models[0], args.batch, args.size[0], args.mode)))
        return

    def log(message):
        print(message, file=sys.stderr, flush=True)

    print(f'# torch {torch.__version__}, {torch.get_num_threads()} threads, mode {args.mode}, '
          f'batch {args.batch}, median of {args.runs} runs after {args.warmup} warm-up'
          + (', interleaved' if args.compare else ''))
    models = {}
    for i, name in enumerate(args.models):
        log(f'[{i + 1}/{len(args.models)}] building {name}')
        models[name] = build_model(name)
    latency = {}
    for size in args.size:
        log(f'size {size[0]}x{size[1]}')
        for name in models:
            stripped = name[len(STRAIGHTFORWARD_PREFIX):]
            if name.startswith(STRAIGHTFORWARD_PREFIX) and stripped in models:
                exact, single = straightforward_difference(models[stripped], models[name], size)
                print(f'{stripped} vs {name} on the same weights: max |difference| '
                      f'{exact:.1e} in float64, {single:.1e} in float32')
        steps = {name: make_step(model, args.batch, size, args.mode)
                 for name, model in models.items()}
        times = time_models(steps, args.warmup, args.runs, args.compare, log)
        memory = {}
        if args.memory:
            for name in models:
                log(f'  memory probe {name}')
                memory[name] = measure_memory(name, args, size)
        latency[size] = {name: statistics.median(t) for name, t in times.items()}
        print_table(size, args, latency[size], memory)
    if args.plot:
        plot(latency, args.plot, args.mode)
        print(f'plot written to {args.plot}')


def print_table(size, args, latency: Dict[str, float], memory: Dict[str, float]):
    first = next(iter(latency.values()))
    header = f'| model | {args.mode} s @{size[0]}x{size[1]} ×{args.batch} | images/s |'
    header += ' × first |' if args.compare else ''
    header += ' peak MiB |' if memory else ''
    print(header)
    print('|' + '---|' * (header.count('|') - 1))
    for name, seconds in latency.items():
        row = f'| {name} | {seconds:.3f} | {args.batch / seconds:.2f} |'
        row += f' {seconds / first:.2f} |' if args.compare else ''
        row += f' {memory[name]:.0f} |' if memory else ''
        print(row)
    for name, seconds in latency.items():
        baseline = STRAIGHTFORWARD_PREFIX + name
        if baseline in latency:
            line = f'{name}: {latency[baseline] / seconds:.2f}× faster than straightforward'
            if memory:
                line += f', {memory[name] / memory[baseline]:.2f}× its peak memory'
            print(line)


def plot(latency: Dict[Tuple[int, int], Dict[str, float]], path: str, mode: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    sizes = sorted(latency, key=lambda s: s[0] * s[1])
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in latency[sizes[0]]:
        axes.plot([h * w / 1e6 for h, w in sizes], [latency[s][name] for s in sizes],
                  marker='o', label=name)
    axes.set_xlabel('input megapixels (H×W / 1e6)')
    axes.set_ylabel(f'{mode} latency (s)')
    axes.set_title('latency against input size')
    axes.grid(alpha=.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == '__main__':
    main()
