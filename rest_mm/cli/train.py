"""Train a detector or a segmentor from an mmdet or mmseg config (the library comes from
its ``default_scope``), on the CPU where there is no CUDA.

The checkpoint a run starts from (``--resume``, ``load_from``) is verified and must fit the
whole model (``--allow-missing`` loads partially, by name); the work dir may not overwrite
an input, must be writable and is held by one live run at a time; checkpoints are saved
atomically (:mod:`rest_mm.cli.checkpoint_hook`); a run refused at its start leaves nothing
behind.
"""
import argparse
import os.path as osp
from typing import Mapping, Optional

import torch
from mmengine.config import Config
from mmengine.runner import find_latest_checkpoint

from rest_mm.cli import errors, preflight, runner_setup, safe_files
from rest_mm.cli.checkpoint_checks import check_model_fits
from rest_mm.weights.files import allow_mmengine_checkpoints, read_checkpoint

# What the Runner writes directly in the work dir, besides the copy of the config.
RUN_OUTPUTS = ('epoch_*.pth', 'iter_*.pth', 'best_*.pth', 'last_checkpoint')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train an mmdet or mmseg model')
    runner_setup.add_runner_arguments(
        parser, 'train', 'logs and checkpoints', 'load_from', 'bbox_head.retina_cls.',
        'train_cfg.max_epochs=2 "model.backbone.init_cfg=None"')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint, or without a value from the latest '
        'checkpoint in the work dir (starting afresh when there is none)')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision: float16 with loss scaling on CUDA, '
                        'bfloat16 on a CPU (fast only where the CPU has amx_bf16 or '
                        'avx512_bf16; the tool says which)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the actual total batch size '
                        "over the config's auto_scale_lr.base_batch_size")
    errors.add_debug_argument(parser)
    return runner_setup.parse_runner_arguments(parser, argv)


def build_config(args) -> Config:
    """The config with the command line applied and adapted to the device."""
    cfg = runner_setup.load_config(args.config, args.launcher, args.cfg_options,
                                   args.work_dir, args.cfg_new_keys)

    if args.amp:
        runner_setup.use_amp(cfg)
    if cfg.optim_wrapper.get('type') == 'AmpOptimWrapper' and not torch.cuda.is_available():
        # mmengine's AmpOptimWrapper asserts CUDA; say which setting to change instead
        raise ValueError(f'{args.config} trains with mixed precision (AmpOptimWrapper, as the '
                         f'recipe it reproduces), which needs a CUDA GPU and none is available; '
                         f'on the CPU pass --amp (bfloat16 autocast) or add --cfg-options '
                         f'optim_wrapper.type=OptimWrapper (float32)')
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
        preflight.check_checkpoint(args.resume, '--resume checkpoint')
        cfg.resume, cfg.load_from = True, args.resume
    else:
        preflight.check_checkpoint(cfg.get('load_from'), 'load_from checkpoint')

    dataloaders = ['train_dataloader'] + (['val_dataloader'] if cfg.get('val_cfg') else [])
    preflight.check_datasets(cfg, dataloaders)
    # A resumed run continues in its work dir (new checkpoint names); load_from may not be
    # where this run writes its checkpoints.
    inputs = {'config': args.config, **preflight.dataset_inputs(cfg, dataloaders)}
    if not cfg.get('resume'):
        inputs['load_from checkpoint'] = cfg.get('load_from')
    preflight.refuse_output_over_inputs(cfg.work_dir, inputs, 'work dir',
                                        written=[osp.basename(args.config), *RUN_OUTPUTS])
    return runner_setup.adapt_config_to_device(cfg, args.launcher)


def read_start_checkpoint(cfg: Config, allow_non_finite: bool = False) -> Optional[Mapping]:
    """The checkpoint the run starts from (``load_from``, or the one it resumes), read and
    verified, its weights finite unless ``allow_non_finite``; a file to resume from must be
    a training checkpoint."""
    if not cfg.get('load_from'):
        return None
    checkpoint = read_checkpoint(cfg.load_from, mmap=True)
    if not allow_non_finite:
        preflight.check_checkpoint_finite(checkpoint, cfg.load_from)
    if cfg.get('resume'):
        preflight.check_resumable(checkpoint, cfg.load_from)
    return checkpoint


@errors.handled
def main(argv=None):
    args = parse_args(argv)
    allow_mmengine_checkpoints()
    cfg = build_config(args)
    checkpoint = read_start_checkpoint(cfg, args.allow_non_finite)
    # a writable work dir that no other live run holds, before anything is built
    safe_files.check_output_path(cfg.work_dir, 'dir', option='work dir')
    safe_files.lock_work_dir(cfg.work_dir)
    runner_setup.init_distributed(cfg, args.launcher)
    with runner_setup.removed_if_start_fails(cfg.work_dir, osp.basename(args.config)) as started:
        runner = runner_setup.build_runner(cfg, [started])
        if checkpoint is not None:
            try:
                check_model_fits(runner.model, checkpoint, cfg.load_from, args.allow_missing)
            except RuntimeError as error:
                raise errors.UserError(f'{error} To start from part of it on purpose, name '
                                       f'what stays initialised: --allow-missing PREFIX ...'
                                       ) from error
            del checkpoint
        runner.train()
    runner_setup.close_distributed()


if __name__ == '__main__':
    main()
