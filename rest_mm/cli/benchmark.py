"""Latency, throughput and peak memory of backbones or whole models, in float32 and under
autocast (bfloat16, float16) with the output error that costs.

Models are named on the command line:

* ours: ``rest_{lite,small,base,large}``, ``restv2_{tiny,small,base,large}``;
* the straightforward implementation (rest_mm/testing/straightforward.py) of the same:
  ``straightforward_rest_small``, ``straightforward_restv2_tiny``, ...;
* mmdet's peers: ``pvt_small`` (PVT-S), ``pvtv2_b1`` (PVTv2-B1), ``swin_tiny`` (Swin-T);
* a config: a file (``configs/detection/....py``) or one shipped with mmdet or mmseg,
  named ``mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py`` or
  ``mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py``. With ``--mode forward`` the
  whole model in ``tensor`` mode (backbone, neck and heads; no post-processing); with
  ``--mode predict`` the whole inference, in three phases (below).

Examples::

    # ours against the straightforward implementation and mmdet's peers, one process
    python tools/benchmark.py --compare --size 800x1344 --threads 2 --memory
    # training step (forward + backward) of ResT-S, 2×3×512×512
    python tools/benchmark.py rest_small straightforward_rest_small --compare \\
        --size 512x512 --batch 2 --mode train
    # latency against input size, drawn to a PNG
    python tools/benchmark.py rest_small swin_tiny --size 320x320 512x512 800x1344 \\
        --plot latency.png
    # float32 against bfloat16 autocast: time and output error (relative L2 per stage)
    python tools/benchmark.py rest_small restv2_tiny swin_tiny --dtype float32 bfloat16 \\
        --threads 1
    # whole detectors, ours beside mmdet's own Swin-T, trained weights for ours
    python tools/benchmark.py configs/detection/retinanet_rest_small_coco.py \\
        mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py --mode predict \\
        --size 800x1333 --dtype float32 bfloat16 --checkpoint work_dirs/rest.pth none

Timing: each measurement is the median wall-clock time of ``--runs`` calls after
``--warmup`` calls. With ``--compare`` the models take turns, one call each per round, so
that load from other processes on a shared machine hits them all alike. Ratios are
latency divided by the first model's latency. ``--device cuda`` runs the models on the GPU
(each time waits for its queued work; refused where torch finds none). ``--matmul-rate``
adds a float32 2048×2048 matmul to the turns and prints each backbone's multiply-accumulates
per second (mmengine's count) as a percentage of the matmul's, both from their fastest run.

Precision (``--dtype``): float32, or the model run under ``torch.autocast`` on the CPU in
bfloat16 or float16, on the same weights. The error of a low-precision run is the relative
L2 distance ``‖y − y₃₂‖ / ‖y₃₂‖`` of each output from float32's (backbones: each stage;
whole models: the features of backbone and neck), on one random input; the table gives the
worst output. bfloat16 is fast only on CPUs with native bfloat16 instructions
(``amx_bf16``, ``avx512_bf16``); the tool says whether this one has them. float16 on a CPU
shows the accuracy of CUDA's mixed precision (``--amp``); its CPU speed means little.
``--mode predict`` runs bfloat16 as ``tools/test.py --amp`` does on a CPU: backbone, neck
and heads under autocast, box decoding, NMS and resizing in float32.

Whole inference (``--mode predict``, configs only), per image of the given size (random
noise, uint8, as the dataset pipeline hands it over, already resized):

* pre-processing: the model's ``data_preprocessor`` (to float, normalise, pad, batch);
  decoding and resizing the image (the dataset pipeline) are not included;
* forward: backbone, neck and heads (for two-stage detectors the RoI heads too);
* post-processing: the heads' ``predict_by_feat`` (box decoding, score threshold, NMS,
  mask pasting; segmentation logits resized to the image) and the model's result
  packing (``postprocess_result`` / ``add_pred_to_datasample``).

Without ``--checkpoint`` the weights are mmengine's initialisation (``init_weights``):
post-processing then works on scores no trained model gives (how many boxes pass the
score threshold decides its time), so its time is not representative; the table shows
how many detections each image kept. Nothing is downloaded: pretrained-weight loading in a
config (``init_cfg`` of type ``Pretrained``, ``pretrained=``) is switched off, with a note.

Memory (``--memory``): the growth of the process's peak resident set size during one
call, in a fresh subprocess per model and size (model built, input made, peak counter
reset, one call). It counts everything the call allocates on the CPU heap (activations,
temporaries, autograd buffers), not the weights.
"""
import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from rest_mm.cli import errors
from rest_mm.cli.builders import (
    build_config_model,
    build_ours,
    data_samples,
    parse_size,
    positive_int,
)
from rest_mm.cli.precision import (
    AMP_DTYPES,
    cpu_bf16_note,
    cpu_model_name,
    run_network_in_amp,
)
from rest_mm.cli.preflight import refuse_output_over_inputs
from rest_mm.cli.runner_setup import adapt_config_to_device
from rest_mm.cli.safe_files import OutputError, atomic_output, check_output_path
from rest_mm.presets import PRESET_NAMES
from rest_mm.testing import straightforward
from rest_mm.torch_compat import cpu_autocast_supports

STRAIGHTFORWARD_PREFIX = 'straightforward_'
PEERS = {
    'pvt_small': dict(type='PyramidVisionTransformer', num_layers=[3, 4, 6, 3]),
    'pvtv2_b1': dict(type='PyramidVisionTransformerV2', embed_dims=64, num_layers=[2, 2, 2, 2]),
    'swin_tiny': dict(type='SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
                      num_heads=[3, 6, 12, 24], window_size=7),
}
DEFAULT_COMPARISON = ['rest_small', 'straightforward_rest_small', 'restv2_tiny',
                      'straightforward_restv2_tiny', 'pvt_small', 'pvtv2_b1', 'swin_tiny']
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
#: Libraries whose shipped configs can be named ``LIBRARY::path/in/its/configs.py``.
CONFIG_LIBRARIES = ('mmdet', 'mmseg')
#: Methods that turn head outputs into results: the post-processing phase of
#: ``--mode predict`` is the time spent in them.
POST_PROCESSING_METHODS = ('predict_by_feat', 'postprocess_result', 'add_pred_to_datasample')
#: ``--checkpoint`` value for random weights.
NO_CHECKPOINT = 'none'
PHASES = ('preprocess', 'forward', 'postprocess')
#: Side of the square float32 matrices whose product gives ``--matmul-rate``'s reference.
MATMUL_SIZE = 2048
MATMUL_LABEL = f'float32 matmul {MATMUL_SIZE}x{MATMUL_SIZE}'


def known_names() -> List[str]:
    return list(PRESET_NAMES) + [STRAIGHTFORWARD_PREFIX + n for n in PRESET_NAMES] + list(PEERS)


def is_config(name: str) -> bool:
    return name.endswith('.py')


def resolve_config(name: str) -> str:
    """The file of a config named by its path or as ``LIBRARY::path`` (a config shipped
    with mmdet or mmseg, under the package's ``.mim/configs``).

    Raises:
        FileNotFoundError: No such file, or the library is not installed.
        ValueError: A ``LIBRARY::`` prefix other than mmdet / mmseg.
    """
    if '::' not in name:
        if not Path(name).is_file():
            raise FileNotFoundError(f'config {name!r} does not exist')
        return name
    library, relative = name.split('::', 1)
    if library not in CONFIG_LIBRARIES:
        raise ValueError(f'config {name!r}: {library!r}:: is no library this tool knows; '
                         f'use {" or ".join(c + "::" for c in CONFIG_LIBRARIES)}')
    spec = importlib.util.find_spec(library)
    if spec is None:
        raise FileNotFoundError(f'config {name!r}: {library} is not installed')
    root = Path(spec.origin).parent / '.mim' / 'configs'
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f'config {name!r} does not exist: no {relative} under {root}')
    return str(path)


def _disable_pretrained(node, where: str) -> List[str]:
    """Switch off every pretrained-weight loading under the config ``node`` (in place):
    ``init_cfg`` entries of type ``Pretrained`` and string ``pretrained`` values.
    Returns where each was, with what it would have loaded."""
    disabled = []
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            here = f'{where}.{key}'
            if key == 'pretrained' and isinstance(value, str):
                disabled.append(f'{here}={value}')
                node[key] = None
            elif key == 'init_cfg' and isinstance(value, dict) and \
                    value.get('type') == 'Pretrained':
                disabled.append(f'{here} ({value.get("checkpoint")})')
                node[key] = None
            elif key == 'init_cfg' and isinstance(value, (list, tuple)):
                kept = [v for v in value if not (isinstance(v, dict) and
                                                 v.get('type') == 'Pretrained')]
                disabled += [f'{here} ({v.get("checkpoint")})' for v in value if v not in kept]
                node[key] = kept
            else:
                disabled += _disable_pretrained(value, here)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            disabled += _disable_pretrained(value, f'{where}[{i}]')
    return disabled


def _initialise_quietly(model: nn.Module) -> None:
    """mmengine's ``init_weights``, without its log line per parameter."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)


def build_whole_model(name: str, checkpoint: Optional[str] = None) -> Tuple[nn.Module, str]:
    """The detector or segmentor of a config, with weights from ``checkpoint`` (one trained
    with the config) or mmengine's initialisation; nothing is downloaded.

    Args:
        name (str): A config path or ``mmdet::`` / ``mmseg::`` name.
        checkpoint (str, optional): A whole-model checkpoint. Defaults to None (random).

    Returns:
        tuple: ``(model, description of its weights)``.
    """
    from mmengine.config import Config
    cfg = adapt_config_to_device(Config.fromfile(resolve_config(name)))
    disabled = _disable_pretrained(cfg.model, 'model')
    if disabled:
        print(f'# {name}: pretrained loading switched off (nothing is downloaded): '
              + '; '.join(disabled))
    model = build_config_model(cfg)
    if checkpoint is None:
        _initialise_quietly(model)
        return model, 'random weights (mmengine init_weights)'
    from rest_mm.cli.checkpoint_checks import load_whole_model
    load_whole_model(model, checkpoint, f'the model of {name} (a checkpoint trained with that '
                     f'config is needed)')
    return model, f'weights {checkpoint}'


def build_model(name: str, checkpoint: Optional[str] = None) -> Tuple[nn.Module, str]:
    """A model by benchmark name or config, with seeded random weights, or for our presets
    and configs those of ``checkpoint``.

    Returns:
        tuple: ``(model, description of its weights)``.
    """
    torch.manual_seed(0)
    if is_config(name):
        model, weights = build_whole_model(name, checkpoint)
    elif name in PRESET_NAMES:
        model, weights = build_ours(name), 'random weights'
        if checkpoint is not None:
            from rest_mm.weights import load_pretrained
            try:
                load_pretrained(model, checkpoint)
            except (FileNotFoundError, RuntimeError) as error:
                raise errors.UserError(f'{checkpoint} does not load into {name}: {error}'
                                       ) from error
            weights = f'weights {checkpoint}'
    elif name.startswith(STRAIGHTFORWARD_PREFIX) and \
            name[len(STRAIGHTFORWARD_PREFIX):] in PRESET_NAMES:
        model, weights = straightforward.build(name[len(STRAIGHTFORWARD_PREFIX):]), \
            'random weights'
    elif name in PEERS:
        from mmdet.registry import MODELS
        from mmengine.registry import init_default_scope
        init_default_scope('mmdet')
        model, weights = MODELS.build(dict(PEERS[name])), 'random weights'
    else:
        raise KeyError(f'unknown model {name!r}: give a config file (.py) or one of '
                       f'{known_names()}')
    return model, weights


def precision(dtype: torch.dtype, device_type: str = 'cpu'):
    """The context a call runs in: nothing for float32, autocast on ``device_type``
    otherwise."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def _device(model: nn.Module) -> torch.device:
    """Where ``model`` runs (``--device``): its parameters' device (the CPU for a model
    without any)."""
    parameter = next(model.parameters(), None)
    return torch.device('cpu') if parameter is None else parameter.device


def _synchronize() -> None:
    """Wait for the GPU's queued work, so that a wall-clock time includes it (nothing to
    wait for where CUDA was never used)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def make_matmul_step(device: torch.device) -> Callable[[], None]:
    """One float32 ``torch.matmul`` of two :data:`MATMUL_SIZE`-square matrices: the
    machine's matrix-product rate, which ``--matmul-rate`` compares the models with."""
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device) for _ in range(2))

    def step():
        torch.matmul(a, b)
    return step


def count_gmac(model: nn.Module, batch: int, size: Tuple[int, int]) -> float:
    """A backbone's multiply-accumulates per call, in billions (mmengine's count with our
    attention handles, ``rest_mm.flops``; ``tools/get_flops.py`` counts the same)."""
    from rest_mm.flops import flop_analyzer
    model.eval()
    with torch.no_grad():
        images = torch.randn(batch, 3, *size, device=_device(model))
        return flop_analyzer(model, (images, )).total() / 1e9


def make_step(model: nn.Module, batch: int, size: Tuple[int, int], mode: str,
              dtype: torch.dtype = torch.float32) -> Callable[[], Optional[dict]]:
    """One inference call (``forward``), one training step's forward and backward
    (``train``), or one whole inference in three timed phases (``predict``, see
    :func:`make_predict_step`)."""
    if mode == 'predict':
        return make_predict_step(model, batch, size, dtype)
    images = torch.randn(batch, 3, *size, device=_device(model))
    samples = data_samples(model, batch, size)

    def run(m):
        with precision(dtype, images.device.type):
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


def _random_images(batch: int, size: Tuple[int, int]) -> List[torch.Tensor]:
    """Images as the dataset pipeline hands them to the model: uint8 C×H×W."""
    return [torch.randint(0, 256, (3, *size), dtype=torch.uint8) for _ in range(batch)]


def _fresh_samples(model: nn.Module, batch: int, size: Tuple[int, int]) -> List:
    """Data samples with the meta information a test pipeline gives (image not rescaled)."""
    if model.default_scope == 'mmseg':
        from mmseg.structures import SegDataSample as Sample
    else:
        from mmdet.structures import DetDataSample as Sample
    return [Sample(metainfo=dict(img_shape=size, ori_shape=size, scale_factor=(1., 1.)))
            for _ in range(batch)]


@contextlib.contextmanager
def timed_post_processing(model: nn.Module) -> Iterator[List[float]]:
    """Within the context, ``spent[0]`` (the yielded list) accumulates the seconds spent
    in the :data:`POST_PROCESSING_METHODS` of ``model`` and its submodules (outermost
    calls only, so nested ones do not count twice)."""
    spent, depth, wrapped = [0.], [0], []
    for module in model.modules():
        for name in POST_PROCESSING_METHODS:
            if not callable(getattr(type(module), name, None)):
                continue
            method = getattr(module, name)

            def timed(*args, _method=method, **kwargs):
                if depth[0]:
                    return _method(*args, **kwargs)
                depth[0] += 1
                _synchronize()  # the forward's queued GPU work is not post-processing
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    _synchronize()
                    spent[0] += time.perf_counter() - start
                    depth[0] -= 1
            setattr(module, name, timed)
            wrapped.append((module, name))
    try:
        yield spent
    finally:
        for module, name in wrapped:
            delattr(module, name)


def make_predict_step(model: nn.Module, batch: int, size: Tuple[int, int],
                      dtype: torch.dtype = torch.float32) -> Callable[[], dict]:
    """A whole inference of a config's model (``mode='predict'``). In bfloat16 as
    ``tools/test.py --amp`` runs it on a CPU (:func:`rest_mm.cli.precision.run_network_in_amp`,
    on a copy of ``model``): backbone, neck and heads under autocast, box decoding, NMS and
    the rest in float32. The step returns the seconds of each of :data:`PHASES` and
    ``detections``, the mean number of detections per image (None for a segmentor)."""
    if getattr(model, 'default_scope', None) is None:
        raise ValueError('--mode predict needs a config\'s whole model, not a backbone')
    if dtype != torch.float32:
        model = copy.deepcopy(model)
        if run_network_in_amp(model, _device(model).type) != dtype:
            raise ValueError(f'--mode predict runs float32, or mixed precision as tools/test.py '
                             f'--amp does on a CPU (bfloat16), not {dtype}')
    model.eval()
    images = _random_images(batch, size)

    def step():
        data = dict(inputs=images, data_samples=_fresh_samples(model, batch, size))
        with torch.no_grad(), timed_post_processing(model) as post:
            start = time.perf_counter()
            data = model.data_preprocessor(data, False)
            _synchronize()
            middle = time.perf_counter()
            results = model(**data, mode='predict')
            end = time.perf_counter()
        kept = [len(r.pred_instances) for r in results if 'pred_instances' in r]
        return dict(preprocess=middle - start, forward=end - middle - post[0],
                    postprocess=post[0],
                    detections=statistics.mean(kept) if kept else None)
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


def precision_errors(model: nn.Module, size: Tuple[int, int],
                     dtypes: List[str]) -> Dict[str, List[float]]:
    """Relative L2 error ``‖y − y₃₂‖ / ‖y₃₂‖`` of each output of each dtype's run against
    float32's, on one random image, same weights, eval mode: a backbone's stage outputs,
    a whole model's features (backbone and neck, ``extract_feat``). float32 itself: zeros.
    """
    generator = torch.Generator().manual_seed(1)
    model.eval()
    with torch.no_grad():
        if getattr(model, 'default_scope', None) is None:
            forward = model
            inputs = torch.randn(1, 3, *size, generator=generator).to(_device(model))
        else:
            image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator)
            data = dict(inputs=[image], data_samples=_fresh_samples(model, 1, size))
            forward, inputs = model.extract_feat, model.data_preprocessor(data, False)['inputs']
        exact = [o.float() for o in _tensors(forward(inputs))]
        errors = {}
        for name in dtypes:
            if DTYPES[name] == torch.float32:
                errors[name] = [0.] * len(exact)
                continue
            with precision(DTYPES[name], _device(model).type):
                outputs = _tensors(forward(inputs))
            errors[name] = [((o.float() - e).norm() / e.norm()).item()
                            for o, e in zip(outputs, exact)]
    return errors


def time_models(steps: Dict[str, Callable[[], Optional[dict]]], warmup: int, runs: int,
                interleave: bool, log: Callable[[str], None]) -> Dict[str, List[dict]]:
    """Each step's calls after warm-up, interleaved if asked: per call ``total`` wall-clock
    seconds and whatever else the step returned (its phases)."""
    times = {name: [] for name in steps}
    for name, step in steps.items():
        for i in range(warmup):
            log(f'  warm-up {name} ({i + 1}/{warmup})')
            step()
            _synchronize()
    order = ([[name for name in steps]] * runs if interleave else
             [[name] for name in steps for _ in range(runs)])
    for round_names in order:
        for name in round_names:
            start = time.perf_counter()
            reported = steps[name]()
            _synchronize()
            times[name].append(dict(reported or {}, total=time.perf_counter() - start))
            log(f'  {name}: run {len(times[name])}/{runs} {times[name][-1]["total"]:.3f} s')
    return times


def _available_memory_bytes() -> int:
    """The memory a new allocation can get: Linux's ``MemAvailable``, elsewhere the
    physical memory."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


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


def probe_memory(name: str, batch: int, size: Tuple[int, int], mode: str,
                 dtype: torch.dtype = torch.float32, checkpoint: Optional[str] = None) -> dict:
    """Peak RSS growth of one call, in this (fresh) process."""
    step = make_step(build_model(name, checkpoint)[0], batch, size, mode, dtype)
    gc.collect()
    before = _rss_bytes()
    exact = _reset_peak_rss()
    step()
    return dict(peak_bytes=_peak_rss_bytes() - before, exact=exact)


def measure_memory(name: str, args, size: Tuple[int, int], dtype: str = 'float32',
                   checkpoint: Optional[str] = None) -> float:
    """Peak memory growth in MiB, measured in a subprocess."""
    command = [sys.executable, '-c', 'from rest_mm.cli.benchmark import main; main()', name,
               '--probe-memory', '--size', f'{size[0]}x{size[1]}', '--batch', str(args.batch),
               '--mode', args.mode, '--dtype', dtype,
               '--checkpoint', checkpoint or NO_CHECKPOINT]
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
    from rest_mm.weights.backbone import load_converted_state_dict
    load_converted_state_dict(ours, convert_checkpoint(straightforward.state_dict()))
    size = (min(size[0], 128), min(size[1], 192))
    x = torch.randn(1, 3, *size, device=_device(ours))
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
                        help='benchmark names or configs (files, or mmdet::/mmseg:: names; '
                        'default with --compare: ' + ' '.join(DEFAULT_COMPARISON) + ')')
    parser.add_argument('--size', type=parse_size, nargs='+', default=[(800, 1344)],
                        help='input sizes HxW (default 800x1344)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--mode', choices=('forward', 'train', 'predict'), default='forward',
                        help='inference, a training step (forward + backward), or a '
                        'config\'s whole inference: pre-processing, forward, post-processing')
    parser.add_argument('--dtype', nargs='+', choices=list(DTYPES), default=['float32'],
                        help='float32 and/or CPU autocast dtypes, timed side by side on the '
                        'same weights, with the output error against float32 (default float32)')
    parser.add_argument('--checkpoint', nargs='+', metavar='CKPT',
                        help='weights, one per model in the order given ("none": random); '
                        'for our presets and configs (a checkpoint trained with the config)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='where the models run (default cpu)')
    parser.add_argument('--matmul-rate', action='store_true',
                        help=f'also time a float32 {MATMUL_SIZE}x{MATMUL_SIZE} matmul, taking '
                        'turns with the backbones (interleaved as with --compare), and print '
                        'each backbone\'s float32 multiply-accumulates per second as a '
                        'percentage of its rate')
    parser.add_argument('--threads', type=positive_int, default=None,
                        help='torch threads (default: torch\'s choice)')
    parser.add_argument('--compare', action='store_true',
                        help='interleave the models\' runs in one process and print ratios')
    parser.add_argument('--memory', action='store_true',
                        help='also measure peak memory growth of one call (subprocess each)')
    parser.add_argument('--plot', metavar='PNG', help='draw latency against input size')
    parser.add_argument('--probe-memory', action='store_true', help=argparse.SUPPRESS)
    errors.add_debug_argument(parser)
    args = parser.parse_args(argv)
    if not args.models:
        if not args.compare:
            parser.error('name at least one model, or use --compare for the default set')
        args.models = list(DEFAULT_COMPARISON)
    if args.batch < 1 or args.runs < 1 or args.warmup < 0:
        parser.error('--batch and --runs must be at least 1, --warmup at least 0')
    memory = _available_memory_bytes()
    for height, width in args.size:
        needed = args.batch * 3 * height * width * 4  # the float32 input alone
        if needed > memory:
            parser.error(f'--size {height}x{width} (--batch {args.batch}): the input tensor '
                         f'alone needs {needed / 2**30:.1f} GiB, more than the '
                         f'{memory / 2**30:.1f} GiB of memory available')
    for what, values in (('model', args.models), ('dtype', args.dtype)):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            parser.error(f'{what} {", ".join(twice)} named more than once')
    configs = {}
    for name in args.models:
        if is_config(name):
            try:
                configs[name] = resolve_config(name)
            except (FileNotFoundError, ValueError) as error:
                parser.error(str(error))
        elif name not in known_names():
            parser.error(f'unknown model {name!r}: give a config (a .py file, or mmdet::/'
                         f'mmseg:: and its path in the library\'s configs) or one of '
                         f'{", ".join(known_names())}')
        elif args.mode == 'predict':
            parser.error(f'--mode predict times a config\'s whole inference; {name!r} is a '
                         f'backbone (use --mode forward)')
    amp = next(name for name, dtype in DTYPES.items() if dtype == AMP_DTYPES[args.device])
    unlike_amp = [d for d in args.dtype if d not in ('float32', amp)]
    if args.mode == 'predict' and unlike_amp:
        parser.error(f'--mode predict runs float32 and {amp} (mixed precision as tools/test.py '
                     f'--amp runs it on {args.device}); {", ".join(unlike_amp)} only with '
                     f'--mode forward or train')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device cuda: torch {torch.__version__} finds no CUDA GPU on this '
                     f'machine; use --device cpu')
    if args.device == 'cuda' and args.memory:
        parser.error('--memory measures the resident memory of a CPU process: --device cpu only')
    if args.matmul_rate and (args.mode != 'forward' or 'float32' not in args.dtype
                             or any(is_config(name) for name in args.models)):
        parser.error('--matmul-rate compares backbones\' float32 inference with the matmul: '
                     'give backbone names, --mode forward and float32 among --dtype')
    if (args.device == 'cpu' and 'float16' in args.dtype
            and not cpu_autocast_supports(torch.float16)):
        parser.error(f'--dtype float16: CPU autocast in float16 needs a newer torch than '
                     f'{torch.__version__} (which has bfloat16 only)')
    args.checkpoints = _checkpoints(parser, args)
    try:
        refuse_output_over_inputs(
            args.plot, {**{f'config {name}': path for name, path in configs.items()},
                        **{f'checkpoint {c}': c for c in args.checkpoints if c}}, '--plot')
    except ValueError as error:
        parser.error(str(error))
    if args.plot:
        _check_writable(parser, args.plot)
    return args


def _checkpoints(parser: argparse.ArgumentParser, args) -> List[Optional[str]]:
    """``--checkpoint`` as one entry per model, None for random weights."""
    if args.checkpoint is None:
        return [None] * len(args.models)
    if len(args.checkpoint) != len(args.models):
        parser.error(f'--checkpoint takes one value per model ({len(args.models)}, in order; '
                     f'"{NO_CHECKPOINT}" for random weights), got {len(args.checkpoint)}')
    checkpoints = []
    for name, checkpoint in zip(args.models, args.checkpoint):
        if checkpoint == NO_CHECKPOINT:
            checkpoints.append(None)
            continue
        if not (is_config(name) or name in PRESET_NAMES):
            parser.error(f'--checkpoint {checkpoint} for {name}: weights load into our presets '
                         f'and configs only; give "{NO_CHECKPOINT}" for {name}')
        if not Path(checkpoint).is_file():
            parser.error(f'checkpoint {checkpoint!r} does not exist')
        checkpoints.append(checkpoint)
    return checkpoints


def _check_writable(parser: argparse.ArgumentParser, path: str) -> None:
    """Refuse, before any timing, an output that cannot be written."""
    folder = Path(path).resolve().parent
    try:  # its kind, and a real file created: the permissions alone do not tell (root, /sys)
        check_output_path(path, 'file', option='--plot')
    except OutputError as error:
        parser.error(str(error))
    if not folder.is_dir():
        parser.error(f'--plot {path}: the folder {folder} does not exist')
    if Path(path).exists() and not os.access(path, os.W_OK):
        parser.error(f'--plot {path}: not writable')
    if importlib.util.find_spec('matplotlib') is None:
        parser.error('--plot needs matplotlib (pip install matplotlib)')


@errors.handled
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_memory:
        print(json.dumps(probe_memory(args.models[0], args.batch, args.size[0], args.mode,
                                      DTYPES[args.dtype[0]], args.checkpoints[0])))
        return

    def log(message):
        print(message, file=sys.stderr, flush=True)

    print(f'# torch {torch.__version__}, {torch.get_num_threads()} threads, mode {args.mode}, '
          f'batch {args.batch}, median of {args.runs} runs after {args.warmup} warm-up'
          + (', interleaved' if args.compare else ''))
    if args.device == 'cuda':
        print(f'# GPU {torch.cuda.get_device_name()}')
    elif args.dtype != ['float32'] or args.matmul_rate:
        print(f'# CPU {cpu_model_name()}; {cpu_bf16_note()}')
    if args.device == 'cpu' and 'float16' in args.dtype:
        print('# float16 on a CPU: its error is that of CUDA mixed precision (--amp); its '
              'speed here means little')
    models, checkpoints = {}, dict(zip(args.models, args.checkpoints))
    for i, name in enumerate(args.models):
        log(f'[{i + 1}/{len(args.models)}] building {name}')
        model, weights = build_model(name, checkpoints[name])
        models[name] = model.to(args.device)
        if is_config(name) or checkpoints[name]:
            print(f'# {name}: {weights}')
    if args.mode == 'predict' and None in args.checkpoints:
        print('# random weights: post-processing handles scores no trained model gives (how '
              'many boxes pass the score threshold sets its time); its time is not '
              'representative, see detections/image')
    runs = {(name, dtype): f'{name} {dtype}' if len(args.dtype) > 1 else name
            for name in models for dtype in args.dtype}
    latency = {}
    for size in args.size:
        log(f'size {size[0]}x{size[1]}')
        for name in models:
            stripped = name[len(STRAIGHTFORWARD_PREFIX):]
            if name.startswith(STRAIGHTFORWARD_PREFIX) and stripped in models:
                exact, single = straightforward_difference(models[stripped], models[name], size)
                print(f'{stripped} vs {name} on the same weights: max |difference| '
                      f'{exact:.1e} in float64, {single:.1e} in float32')
        errors = {}
        if args.dtype != ['float32']:
            for name, model in models.items():
                log(f'  output error against float32: {name}')
                errors[name] = precision_errors(model, size, args.dtype)
        steps = {label: make_step(models[name], args.batch, size, args.mode, DTYPES[dtype])
                 for (name, dtype), label in runs.items()}
        gmac = {}
        if args.matmul_rate:
            log('  counting multiply-accumulates')
            gmac = {runs[name, 'float32']: count_gmac(models[name], args.batch, size)
                    for name in models}
            steps[MATMUL_LABEL] = make_matmul_step(torch.device(args.device))
        # the matmul takes turns with the models: the same load from other work hits both
        times = time_models(steps, args.warmup, args.runs, args.compare or args.matmul_rate,
                            log)
        matmul_times = times.pop(MATMUL_LABEL, None)
        memory = {}
        if args.memory:
            for (name, dtype), label in runs.items():
                log(f'  memory probe {label}')
                memory[label] = measure_memory(name, args, size, dtype, checkpoints[name])
        latency[size] = {label: statistics.median(t['total'] for t in times[label])
                         for label in times}
        if args.dtype == ['float32'] and args.mode != 'predict':
            print_table(size, args, latency[size], memory)
        else:
            print_precision_table(size, args, runs, times, errors, memory)
        if matmul_times:
            print_matmul_rate(matmul_times, times, gmac)
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


def print_matmul_rate(matmul_times: List[dict], times: Dict[str, List[dict]],
                      gmac: Dict[str, float]):
    """The float32 matmul's rate and each backbone's, both from their fastest run (the
    least disturbed by other work on the machine)."""
    rate = MATMUL_SIZE ** 3 / 1e9 / min(t['total'] for t in matmul_times)
    print(f'float32 matmul {MATMUL_SIZE}x{MATMUL_SIZE}: {rate:.1f} GMAC/s (fastest run)')
    for label, count in gmac.items():
        seconds = min(t['total'] for t in times[label])
        print(f'{label}: {count:.3g} GMAC in {seconds:.3f} s (fastest run) = '
              f'{count / seconds:.1f} GMAC/s, {100 * count / seconds / rate:.0f} % of the '
              f'matmul rate')


def print_precision_table(size, args, runs: Dict[Tuple[str, str], str],
                          times: Dict[str, List[dict]], errors: Dict[str, Dict[str, List[float]]],
                          memory: Dict[str, float]):
    """The table of ``--mode predict`` or of several dtypes: a row per model and dtype,
    times (per phase for ``predict``), ratios, worst output error against float32, and
    the errors of every output below it."""
    def median(label, key):
        return statistics.median(t[key] for t in times[label])

    predict = args.mode == 'predict'
    against_float32 = 'float32' in args.dtype and len(args.dtype) > 1
    shape = f'@{size[0]}x{size[1]} ×{args.batch}'
    columns = ['model', 'dtype']
    columns += ([f'{p} s' for p in ('pre-processing', 'forward', 'post-processing')]
                + [f'total s {shape}'] if predict else [f'{args.mode} s {shape}'])
    columns += ['images/s'] + ['× first'] * args.compare + ['× float32'] * against_float32
    columns += ['worst rel. L2 vs float32'] * bool(errors) + ['detections/image'] * predict
    columns += ['peak MiB'] * bool(memory)
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '---|' * len(columns))
    first = median(next(iter(runs.values())), 'total')
    for (name, dtype), label in runs.items():
        total = median(label, 'total')
        cells = [name, dtype]
        if predict:
            # significant digits: a phase of a small image can take well under a millisecond
            cells += [f'{median(label, phase):.4g}' for phase in PHASES]
        cells += [f'{total:.4g}' if predict else f'{total:.3f}', f'{args.batch / total:.2f}']
        if args.compare:
            cells.append(f'{total / first:.2f}')
        if against_float32:
            cells.append(f'{total / median(runs[name, "float32"], "total"):.2f}')
        if errors:
            cells.append('—' if dtype == 'float32' else f'{max(errors[name][dtype]):.1e}')
        if predict:
            kept = times[label][-1]['detections']
            cells.append('—' if kept is None else f'{kept:.1f}')
        if memory:
            cells.append(f'{memory[label]:.0f}')
        print('| ' + ' | '.join(cells) + ' |')
    if predict:
        print('(pre-processing: data_preprocessor; forward: backbone, neck, heads; '
              'post-processing: predict_by_feat and result packing; see --help)')
    for (name, dtype), label in runs.items():
        if errors and dtype != 'float32':
            what = 'feature level' if is_config(name) else 'stage'
            print(f'{name} {dtype}: relative L2 error against float32 per {what}: '
                  + ' '.join(f'{e:.1e}' for e in errors[name][dtype]))


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
    with atomic_output(path) as temporary:  # a full disk leaves a previous plot as it was
        figure.savefig(temporary, dpi=120)  # the format from the name's extension
    plt.close(figure)


if __name__ == '__main__':
    main()
