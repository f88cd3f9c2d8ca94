"""Train a detector or a segmentor from an mmdet or mmseg config.

The library comes from the config's ``default_scope``, so one tool serves both::

    python tools/train.py configs/detection/retinanet_rest_small_coco.py
    python tools/train.py configs/segmentation/upernet_restv2_tiny_ade20k.py --amp
    python tools/train.py CONFIG --resume                 # the work dir's latest checkpoint
    python tools/train.py CONFIG --resume work_dirs/x/epoch_3.pth
    bash tools/dist_train.sh CONFIG 8                     # 8 GPUs (or 8 CPU processes)

Without CUDA it runs on the CPU: SyncBN becomes BN and distributed runs use gloo (see
``rest_mm/runtime.py``).
"""
import argparse
import os
import os.path as osp

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS, init_default_scope
from mmengine.runner import Runner, find_latest_checkpoint

from rest_mm import runtime


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train an mmdet or mmseg model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and checkpoints '
                        '(default: work_dirs/<config name>)')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint, or without a value from the latest '
        'checkpoint in the work dir (starting afresh when there is none)')
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
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise ValueError(f'--auto-scale-lr: {args.config} has no '
                             'auto_scale_lr.base_batch_size to scale from')
        cfg.auto_scale_lr.enable = True

    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
        if find_latest_checkpoint(cfg.work_dir) is None:
            print(f'--resume: no checkpoint in {cfg.work_dir} yet, training from the start')
            cfg.resume = False
    elif args.resume is not None:
        runtime.check_checkpoint(args.resume, '--resume checkpoint')
        cfg.resume, cfg.load_from = True, args.resume
    else:
        runtime.check_checkpoint(cfg.get('load_from'), 'load_from checkpoint')

    runtime.check_datasets(cfg, ['train_dataloader'] + (
        ['val_dataloader'] if cfg.get('val_cfg') else []))
    return runtime.adapt_config_to_device(cfg, args.launcher)


def main(argv=None):
    args = parse_args(argv)
    runtime.allow_mmengine_checkpoints()
    cfg = build_config(args)
    runtime.init_distributed(cfg, args.launcher)
    if 'runner_type' in cfg:  # a custom runner, registered in the config's library
        init_default_scope(cfg.default_scope)
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    runner.train()
    runtime.close_distributed()


if __name__ == '__main__':
    main()
