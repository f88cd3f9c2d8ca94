"""Train a detector or a segmentor from an mmdet or mmseg config.

The library comes from the config's ``default_scope``, so one tool serves both::

    python tools/train.py configs/detection/retinanet_rest_small_coco.py
    python tools/train.py configs/segmentation/upernet_restv2_tiny_ade20k.py --amp
    python tools/train.py CONFIG --resume                 # the work dir's latest checkpoint
    python tools/train.py CONFIG --resume work_dirs/x/epoch_3.pth
    bash tools/dist_train.sh CONFIG 8                     # 8 GPUs (or 8 CPU processes)

Without CUDA it runs on the CPU: SyncBN becomes BN and distributed runs use gloo (see
``rest_mm/runtime.py``).

The checkpoint a run starts from (``--resume``, ``load_from``) is verified (zip checksums)
and must fit the whole model (``--allow-missing PREFIX ...`` loads partially, by name); a
``--resume`` file must be a training checkpoint. The work dir may not overwrite the config
(the Runner copies it there) or the ``load_from`` checkpoint, nor lie in the dataset. A run
refused at its start leaves nothing behind in the work dir.
"""
import argparse
import os
import os.path as osp
from typing import Mapping, Optional

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS, init_default_scope
from mmengine.runner import Runner, find_latest_checkpoint

from rest_mm import runtime
from rest_mm.checkpoint_files import allow_mmengine_checkpoints
from rest_mm.checkpoint import check_model_fits, read_checkpoint

# What the Runner writes directly in the work dir, besides the copy of the config.
RUN_OUTPUTS = ('epoch_*.pth', 'iter_*.pth', 'best_*.pth', 'last_checkpoint')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train an mmdet or mmseg model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and checkpoints '
                        '(default: work_dirs/<config name>)')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint, or without a value from the latest '
        'checkpoint in the work dir (starting afresh when there is none)')
    parser.add_argument('--allow-missing', nargs='+', default=[], metavar='PREFIX',
                        help='load_from partially: model keys under these prefixes (e.g. '
                        'bbox_head.retina_cls.) may be absent from the checkpoint or mis-shaped '
                        'and keep their initialisation; checkpoint keys under them are ignored')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision (needs a CUDA GPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the actual total batch size '
                        "over the config's auto_scale_lr.base_batch_size")
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value pairs, e.g. '
        'train_cfg.max_epochs=2 "model.backbone.init_cfg=None"')
    parser.add_argument('--launcher', choices=runtime.LAUNCHERS, default='none',
                        help='job launcher')
    # torch.distributed.launch passes --local-rank (torchrun sets LOCAL_RANK instead).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    if args.amp and not torch.cuda.is_available():
        parser.error('--amp needs a CUDA GPU and none is available (torch '
                     f'{torch.__version__}); train without --amp on the CPU')
    if not osp.isfile(args.config):
        parser.error(f'config {args.config!r} does not exist')
    return args


def build_config(args) -> Config:
    """The config with the command line applied and adapted to the device."""
    cfg = runtime.load_config(args.config, args.launcher, args.cfg_options, args.work_dir)

    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if cfg.optim_wrapper.get('type') == 'AmpOptimWrapper' and not torch.cuda.is_available():
        # mmengine's AmpOptimWrapper asserts CUDA; say which setting to change instead
        raise SystemExit(f'{args.config} trains with mixed precision (AmpOptimWrapper, as the '
                         f'recipe it reproduces), which needs a CUDA GPU and none is available; '
                         f'on the CPU add --cfg-options optim_wrapper.type=OptimWrapper')
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise ValueError(f'--auto-scale-lr: {args.config} has no '
                             'auto_scale_lr.base_batch_size to scale from')
        cfg.auto_scale_lr.enable = True

    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, find_latest_checkpoint(cfg.work_dir)
        if cfg.load_from is None:
            print(f'--resume: no checkpoint in {cfg.work_dir} yet, training from the start')
            cfg.resume = False
    elif args.resume is not None:
        runtime.check_checkpoint(args.resume, '--resume checkpoint')
        cfg.resume, cfg.load_from = True, args.resume
    else:
        runtime.check_checkpoint(cfg.get('load_from'), 'load_from checkpoint')

    dataloaders = ['train_dataloader'] + (['val_dataloader'] if cfg.get('val_cfg') else [])
    runtime.check_datasets(cfg, dataloaders)
    # A resumed run continues in its work dir (new checkpoint names); load_from may not be
    # where this run writes its checkpoints.
    inputs = {'config': args.config, **runtime.dataset_inputs(cfg, dataloaders)}
    if not cfg.get('resume'):
        inputs['load_from checkpoint'] = cfg.get('load_from')
    runtime.refuse_output_over_inputs(cfg.work_dir, inputs, 'work dir',
                                      written=[osp.basename(args.config), *RUN_OUTPUTS])
    return runtime.adapt_config_to_device(cfg, args.launcher)


def read_start_checkpoint(cfg: Config) -> Optional[Mapping]:
    """The checkpoint the run starts from (``load_from``, or the one it resumes), read and
    verified; a file to resume from must be a training checkpoint."""
    if not cfg.get('load_from'):
        return None
    checkpoint = read_checkpoint(cfg.load_from, mmap=True)
    if cfg.get('resume'):
        runtime.check_resumable(checkpoint, cfg.load_from)
    return checkpoint


def main(argv=None):
    args = parse_args(argv)
    allow_mmengine_checkpoints()
    try:
        cfg = build_config(args)
        checkpoint = read_start_checkpoint(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise SystemExit(f'tools/train.py: {error}')
    runtime.init_distributed(cfg, args.launcher)
    with runtime.removed_if_start_fails(cfg.work_dir, osp.basename(args.config)) as started:
        if 'runner_type' in cfg:  # a custom runner, registered in the config's library
            init_default_scope(cfg.default_scope)
            runner = RUNNERS.build(cfg)
        else:
            runner = Runner.from_cfg(cfg)
        runner.register_hook(started)
        if checkpoint is not None:
            try:
                check_model_fits(runner.model, checkpoint, cfg.load_from, args.allow_missing)
            except RuntimeError as error:
                raise SystemExit(f'tools/train.py: {error} To start from part of it on '
                                 f'purpose, name what stays initialised: --allow-missing '
                                 f'PREFIX ...')
            del checkpoint
        runner.train()
    runtime.close_distributed()


if __name__ == '__main__':
    main()
