"""How ``tools/train.py`` and ``tools/test.py`` set up mmengine's Runner: their shared
options, config loading, adaptation to a machine without CUDA (SyncBN, gloo, bfloat16
``--amp``), a logger hook that writes the test metrics from rank 0 only, building the Runner
and clean-up after a run that failed to start. README, "Train, test, distributed", says why
each is needed. Importing it registers ``RankZeroLoggerHook`` in mmengine's HOOKS and
``CPUAmpOptimWrapper`` (``--amp`` on a CPU) in its OPTIM_WRAPPERS.
"""
import argparse
import copy
import itertools
import os
import os.path as osp
import re
import shutil
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import torch
from mmengine.config import Config, ConfigDict
from mmengine.dist import is_main_process
from mmengine.hooks import Hook, LoggerHook
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from mmengine.registry import HOOKS, OPTIM_WRAPPERS, RUNNERS, init_default_scope
from mmengine.runner import Runner

from rest_mm.cli.checkpoint_hook import use_atomic_checkpoints
from rest_mm.cli.config_overrides import add_override_arguments, apply_overrides
from rest_mm.cli.precision import amp_dtype, cpu_bf16_note
from rest_mm.cli.preflight import check_scope

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


# ---------------------------------------------------------------------------------------
# The command line train and test share.
# ---------------------------------------------------------------------------------------
def model_key_prefix(text: str) -> str:
    """An ``--allow-missing`` prefix, for argparse's ``type``: every key starts with an empty
    (or blank) prefix, so it would accept any checkpoint, another model's included."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f'{text!r} is no model key prefix: give the start of '
                                         f'the keys allowed to be missing, e.g. roi_head.')
    return text


def add_runner_arguments(parser: argparse.ArgumentParser, purpose: str, work_dir_holds: str,
                         loading: str, example_prefix: str, example_options: str) -> None:
    """Add the config (first positional argument), ``--work-dir``, ``--allow-missing``,
    ``--allow-non-finite``, ``--cfg-options`` and ``--cfg-new-keys``, ``--launcher`` and
    ``--local-rank``.

    Args:
        parser (ArgumentParser): The tool's parser.
        purpose (str): ``'train'`` or ``'test'``, for the config's help.
        work_dir_holds (str): What the run writes to the work dir, for its help.
        loading (str): What ``--allow-missing`` makes partial (``'load_from'``,
            ``'load'``), for its help.
        example_prefix (str): A model key prefix, for ``--allow-missing``'s help.
        example_options (str): ``key=value`` examples, for ``--cfg-options``' help.
    """
    parser.add_argument('config', help=f'{purpose} config file path')
    parser.add_argument('--work-dir', help=f'the dir to save {work_dir_holds} '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--allow-missing', nargs='+', default=[], metavar='PREFIX',
                        type=model_key_prefix,
                        help=f'{loading} partially: model keys under these prefixes (e.g. '
                        f'{example_prefix}) may be absent from the checkpoint or mis-shaped '
                        'and keep their initialisation; checkpoint keys under them are ignored')
    parser.add_argument('--allow-non-finite', action='store_true',
                        help=f'{loading} weights holding NaN or Inf (refused by default, naming '
                        'the tensors: a damaged file or a diverged run)')
    add_override_arguments(parser, example_options)
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torchrun sets LOCAL_RANK instead).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_runner_arguments(parser: argparse.ArgumentParser,
                           argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line of a parser built with :func:`add_runner_arguments`: sets
    ``LOCAL_RANK`` from ``--local-rank`` unless set, and refuses a missing config."""
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    if not osp.isfile(args.config):
        parser.error(f'config {args.config!r} does not exist')
    return args


# ---------------------------------------------------------------------------------------
# Running without CUDA.
# ---------------------------------------------------------------------------------------
def _replace_sync_bn(node) -> int:
    """Turn every ``type='SyncBN'`` under ``node`` into ``'BN'``; returns how many."""
    replaced = 0
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN'):
            node['type'] = 'BN'
            replaced += 1
        for value in node.values():
            replaced += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            replaced += _replace_sync_bn(value)
    return replaced


def load_config(path: str, launcher: str = 'none',
                cfg_options: Sequence[Tuple[str, str]] = (), work_dir: Optional[str] = None,
                new_keys: Sequence[str] = ()) -> Config:
    """The config at ``path`` with the command line's launcher, ``--cfg-options`` (checked,
    :func:`~rest_mm.cli.config_overrides.apply_overrides`; ``new_keys`` from
    ``--cfg-new-keys``) and ``--work-dir`` applied (default work dir:
    ``work_dirs/<config name>``) and checkpoints saved atomically
    (:func:`~rest_mm.cli.checkpoint_hook.use_atomic_checkpoints`), as ``tools/train.py`` and
    ``tools/test.py`` both need it."""
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    apply_overrides(cfg, cfg_options, new_keys, path)
    check_scope(cfg, path)
    use_atomic_checkpoints(cfg)  # no kill or full disk leaves the work dir without one
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


def adapt_config_to_device(cfg: Config, launcher: str = 'none') -> Config:
    """Make ``cfg`` runnable where CUDA is missing; a no-op where it is present.

    Args:
        cfg (Config): The config, changed in place.
        launcher (str): One of ``LAUNCHERS``.

    Returns:
        Config: ``cfg``.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f'launcher must be one of {LAUNCHERS}, got {launcher!r}')
    if torch.cuda.is_available():
        return cfg
    replaced = sum(_replace_sync_bn(cfg[key]) for key in cfg.keys())
    if replaced:
        print_log(f'No CUDA: {replaced} SyncBN norm config(s) replaced by BN', logger='current')
    if cfg.get('sync_bn'):
        print_log(f'No CUDA: sync_bn={cfg.sync_bn!r} dropped, SyncBN needs CUDA',
                  logger='current', level=30)
        cfg.sync_bn = None
    if launcher != 'none':
        env_cfg = cfg.setdefault('env_cfg', ConfigDict())
        env_cfg.setdefault('dist_cfg', ConfigDict())['backend'] = 'gloo'
        wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(
            type='MMDistributedDataParallel', broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
        wrapper['device_ids'] = None  # DDP of a CPU module takes no device ids
        cfg.model_wrapper_cfg = wrapper
    return cfg


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """Mixed precision on a CPU (``tools/train.py --amp`` without CUDA), where mmengine's
    ``AmpOptimWrapper`` refuses to run: the model's forward and losses run under bfloat16
    autocast; the backward follows the forward's dtypes; parameters, gradients and the
    optimizer stay float32. No loss scaling: bfloat16 has float32's exponent range, so
    gradients do not underflow as float16's do. Its checkpoints are those of
    ``OptimWrapper`` (nothing more to save).

    Args:
        **kwargs: ``OptimWrapper``'s arguments.
    """

    dtype = amp_dtype('cpu')

    @contextmanager
    def optim_context(self, model: torch.nn.Module) -> Iterator[None]:
        with super().optim_context(model), torch.autocast('cpu', dtype=self.dtype):
            yield


# What only mmengine's AmpOptimWrapper takes: its loss scaler (float16 on CUDA) and FSDP
# variant have no use in bfloat16 on a CPU.
_CUDA_AMP_ONLY = ('loss_scale', 'use_fsdp')


def use_amp(cfg: Config) -> Config:
    """Train ``cfg`` in mixed precision (``--amp``): mmengine's ``AmpOptimWrapper`` (float16
    autocast, dynamic loss scaling) where CUDA is available, else
    :class:`CPUAmpOptimWrapper` (bfloat16), with a line saying whether the CPU computes
    bfloat16 natively. Changes ``cfg`` in place.

    Raises:
        ValueError: On a CPU, a config whose ``optim_wrapper.dtype`` asks for another
            dtype than bfloat16.
    """
    wrapper = cfg.optim_wrapper
    if torch.cuda.is_available():
        wrapper.type = 'AmpOptimWrapper'
        wrapper.setdefault('loss_scale', 'dynamic')
        return cfg
    if wrapper.get('dtype') not in (None, 'bfloat16', torch.bfloat16):
        raise ValueError(f"--amp on a CPU computes in bfloat16; the config's "
                         f"optim_wrapper.dtype={wrapper.dtype!r} asks for another. Remove it "
                         f'(--cfg-options optim_wrapper.dtype=None) or train on CUDA')
    dropped = [key for key in _CUDA_AMP_ONLY if key in wrapper]
    for key in ('dtype', *dropped):
        wrapper.pop(key, None)
    if dropped:
        print_log(f'--amp on a CPU: {", ".join(f"optim_wrapper.{key}" for key in dropped)} '
                  f'dropped (CUDA float16 loss scaling; bfloat16 needs none)', logger='current')
    wrapper.type = 'CPUAmpOptimWrapper'
    print_log(cpu_bf16_note(), logger='current')
    return cfg


@contextmanager
def _without_cuda_set_device() -> Iterator[None]:
    original = torch.cuda.set_device
    torch.cuda.set_device = lambda device: None
    try:
        yield
    finally:
        torch.cuda.set_device = original


def init_distributed(cfg: Config, launcher: str) -> None:
    """Initialise the process group on a machine without CUDA (gloo).

    With CUDA, or with ``launcher='none'``, this does nothing and the Runner initialises
    as usual. Call it after :func:`adapt_config_to_device` and before building the Runner.
    """
    if launcher == 'none' or torch.cuda.is_available() or torch.distributed.is_initialized():
        return
    from mmengine.dist import init_dist
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    dist_cfg['backend'] = 'gloo'
    with _without_cuda_set_device():
        init_dist(launcher, **dist_cfg)


@HOOKS.register_module()
class RankZeroLoggerHook(LoggerHook):
    """mmengine's ``LoggerHook``, with the test metrics logged and dumped to json by
    rank 0 only (every rank holds the same, already collected, metrics)."""

    def after_test_epoch(self, runner, metrics: Optional[dict] = None) -> None:
        if is_main_process():
            super().after_test_epoch(runner, metrics)


def write_test_metrics_from_rank_zero(cfg: Config) -> Config:
    """Make the config's ``LoggerHook`` a :class:`RankZeroLoggerHook` (same arguments);
    a config with another logger hook is left as it is. Changes ``cfg`` in place."""
    logger_hook = cfg.get('default_hooks', {}).get('logger')
    if logger_hook is not None and logger_hook.get('type') in ('LoggerHook', LoggerHook):
        logger_hook['type'] = 'RankZeroLoggerHook'
    return cfg


def close_distributed() -> None:
    """Destroy the process group at the end of a run, as torch asks, once every rank has
    got there: left to interpreter exit, or destroyed by a rank while rank 0 still logs
    and saves, gloo's threads aborted a finished run (``terminate called without an active
    exception``, seen twice in the two-process test, the second time with the destroy but
    without the barrier)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Building the Runner, and clean-up after a run that failed to start.
# ---------------------------------------------------------------------------------------
# mmengine's Runner names each run's log folder by its start time.
_RUN_FOLDER = re.compile(r'^\d{8}_\d{6}$')


class RunStartedHook(Hook):
    """Notes that a run got past its start (checkpoint loaded, first loop entered)."""
    priority = 'HIGHEST'

    def __init__(self):
        self.started = False

    def before_train(self, runner) -> None:
        self.started = True

    def before_val(self, runner) -> None:
        self.started = True

    def before_test(self, runner) -> None:
        self.started = True


@contextmanager
def removed_if_start_fails(work_dir: str, config_name: str) -> Iterator[RunStartedHook]:
    """Remove what a run that fails before it starts leaves in its work dir.

    mmengine's Runner creates the work dir, a timestamped log folder in it and a copy of
    the config when it is built, before the model's checkpoint is loaded; a run refused
    then (a checkpoint that does not fit, a model that cannot be built) would leave them
    behind, one more folder per attempt. Pass the yielded hook to :func:`build_runner`; if the
    block raises before the hook saw a loop start, the log folders and config copy that
    appeared during the block are removed, and the work dir too if it was created and is
    left empty. A run that started keeps everything.

    Args:
        work_dir (str): The run's work dir.
        config_name (str): The file name the Runner copies the config to.
    """
    before = set(os.listdir(work_dir)) if osp.isdir(work_dir) else None
    hook = RunStartedHook()
    try:
        yield hook
    except BaseException:
        if not hook.started and is_main_process() and osp.isdir(work_dir):
            for name in set(os.listdir(work_dir)) - (before or set()):
                path = osp.join(work_dir, name)
                if _RUN_FOLDER.match(name) and osp.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif name == config_name and osp.isfile(path):
                    os.remove(path)
            if before is None and not os.listdir(work_dir):
                os.rmdir(work_dir)
        raise


# Numbers the runners of one process (see build_runner).
_RUNNERS_BUILT = itertools.count(1)


def build_runner(cfg: Config, hooks: Iterable[Hook] = ()) -> Runner:
    """The Runner of ``cfg`` with ``hooks`` registered: the custom runner its
    ``runner_type`` names (registered in the config's library), else mmengine's.

    Each runner gets a visualizer of its own: mmengine builds a named visualizer with
    ``get_instance``, which returns an earlier runner's of the same name (mmdet and mmseg
    name theirs ``'visualizer'``), so a second run in one process (the main job, the device
    check) wrote its scalars and config into the first run's folder, or failed when that
    folder was gone.
    """
    visualizer = cfg.get('visualizer')
    if isinstance(visualizer, dict) and 'name' in visualizer:
        # A copy: the caller's config (and its copies, which share the dict) keep the name.
        cfg = copy.copy(cfg)
        cfg.visualizer = dict(visualizer, name=f'{visualizer["name"]}_run{next(_RUNNERS_BUILT)}')
    if 'runner_type' in cfg:
        init_default_scope(cfg.default_scope)
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    for hook in hooks:
        runner.register_hook(hook)
    return runner
