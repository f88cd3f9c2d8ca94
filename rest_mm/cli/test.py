"""Evaluate a trained detector or segmentor with its config's ``test_evaluator`` (COCO
mAP, mIoU, ...).

The checkpoint is verified and must fit the whole model before the Runner loads it
(mmengine alone would test a partly random model after a warning); ``--allow-missing``
loads partially, by name.
``--out``, ``--show-dir`` and the work dir may not overwrite an input and are checked
writable before the evaluation; ``--out`` is written atomically.
"""
import argparse
import os.path as osp

import torch
from mmengine.config import Config
from mmengine.logging import print_log

from rest_mm.cli import errors, preflight, runner_setup, safe_files
from rest_mm.cli.checkpoint_checks import check_model_fits, check_preprocessing
from rest_mm.cli.precision import cpu_bf16_note, run_network_in_amp
from rest_mm.weights.files import allow_mmengine_checkpoints, read_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and evaluate) an mmdet or mmseg model')
    runner_setup.add_runner_arguments(parser, 'test', 'the file containing the metrics',
                                      'load', 'auxiliary_head.',
                                      'test_dataloader.batch_size=4')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='also dump the predictions to this .pkl file')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='save pictures of the predictions in this dir '
                        '(mmdet: relative paths are under work_dir/<timestamp>/)')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='seconds each picture stays on screen with --show')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation: the config's tta_pipeline and tta_model "
                        '(UperNet: multi-scale + flip, as the published ADE20K mIoU)')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: the model runs under autocast, bfloat16 on a CPU '
                        '(fast only where it has amx_bf16 or avx512_bf16; the tool says '
                        'which), float16 on CUDA; post-processing and evaluation in float32')
    errors.add_debug_argument(parser)
    args = runner_setup.parse_runner_arguments(parser, argv)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must name a .pkl file, got {args.out!r}')
    return args


def _show_predictions(cfg: Config, args):
    """Switch on the config's visualization hook, as mmdet's and mmseg's tools do."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise ValueError('--show/--show-dir need a visualization hook in default_hooks, e.g. '
                         "visualization=dict(type='DetVisualizationHook')")
    hook['draw'] = True
    if args.show:
        hook['show'], hook['wait_time'] = True, args.wait_time
    if args.show_dir:
        if cfg.default_scope == 'mmdet':
            hook['test_out_dir'] = args.show_dir
        else:  # mmseg's hook hands pictures to the visualizer's backends
            cfg.visualizer['save_dir'] = args.show_dir


def _refuse_outputs_over_inputs(cfg: Config, args):
    inputs = {'config': args.config, 'checkpoint': args.checkpoint,
              **preflight.dataset_inputs(cfg, ['test_dataloader'])}
    preflight.refuse_output_over_inputs(args.out, inputs, '--out')
    # mmdet puts a relative --show-dir under the run's new timestamped folder
    if args.show_dir and (cfg.default_scope != 'mmdet' or osp.isabs(args.show_dir)):
        preflight.refuse_output_over_inputs(args.show_dir, inputs, '--show-dir')
    # The Runner copies the config into the work dir; the rest goes to a new folder.
    preflight.refuse_output_over_inputs(cfg.work_dir, inputs, 'work dir',
                                        written=[osp.basename(args.config)])


def _use_tta(cfg: Config, config_path: str):
    """Test with the config's ``tta_pipeline`` and its ``tta_model`` wrapping the model, as
    mmdet's and mmseg's tools do."""
    missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if missing:
        raise ValueError(f'--tta needs {" and ".join(missing)} in the config; {config_path} has '
                         "none (e.g. tta_model=dict(type='SegTTAModel') and a tta_pipeline with "
                         "a TestTimeAug transform, as configs/segmentation/ define them)")
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.tta_model.module = cfg.model
    cfg.model = cfg.tta_model


def _tested_model(model):
    """The model the checkpoint is for, inside DDP and a TTA model (as mmengine loads it)."""
    from mmengine.model import BaseTTAModel, is_model_wrapper
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


def _check_outputs(cfg: Config, args):
    """Outputs of the right kind and writable, before the evaluation (not after it)."""
    if args.out is not None:
        safe_files.check_output_path(args.out, 'file', option='--out')
    if args.show_dir and (cfg.default_scope != 'mmdet' or osp.isabs(args.show_dir)):
        safe_files.check_output_path(args.show_dir, 'dir', option='--show-dir')
    safe_files.check_output_path(cfg.work_dir, 'dir', option='work dir')


def build_config(args) -> Config:
    cfg = runner_setup.load_config(args.config, args.launcher, args.cfg_options,
                                   args.work_dir, args.cfg_new_keys)
    preflight.check_checkpoint(args.checkpoint)
    cfg.load_from = args.checkpoint
    if args.tta:
        _use_tta(cfg, args.config)
    if args.show or args.show_dir:
        _show_predictions(cfg, args)
    preflight.check_datasets(cfg, ['test_dataloader'])
    _refuse_outputs_over_inputs(cfg, args)
    _check_outputs(cfg, args)
    runner_setup.write_test_metrics_from_rank_zero(cfg)
    return runner_setup.adapt_config_to_device(cfg, args.launcher)


@errors.handled
def main(argv=None):
    args = parse_args(argv)
    allow_mmengine_checkpoints()
    cfg = build_config(args)
    checkpoint = read_checkpoint(args.checkpoint, mmap=True)  # verified; data mapped
    if not args.allow_non_finite:
        preflight.check_checkpoint_finite(checkpoint, args.checkpoint)
    meta = checkpoint.get('meta') or {}
    if meta.get('source') == 'detectron2':  # the authors' detectors: their input format
        check_preprocessing(cfg, meta)
    runner_setup.init_distributed(cfg, args.launcher)
    with runner_setup.removed_if_start_fails(cfg.work_dir, osp.basename(args.config)) as started:
        runner = runner_setup.build_runner(cfg, [started])
        try:
            check_model_fits(_tested_model(runner.model), checkpoint, args.checkpoint,
                             args.allow_missing)
        except RuntimeError as error:
            raise errors.UserError(f'{error} To test a partly initialised model on purpose, '
                                   f'name the parts: --allow-missing PREFIX ...') from error
        del checkpoint
        if args.amp:
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
            try:
                dtype = run_network_in_amp(_tested_model(runner.model), device)
            except ValueError as error:
                raise ValueError(f'--amp: {error}') from error
            print_log(f'--amp: the network runs in {dtype} autocast on {device}',
                      logger='current')
            if device == 'cpu':
                print_log(cpu_bf16_note(), logger='current')
        if args.out is not None:
            if cfg.default_scope == 'mmdet':
                from mmdet.evaluation import DumpDetResults as DumpResults
            else:
                from mmengine.evaluator import DumpResults
            runner.test_evaluator.metrics.append(
                safe_files.written_atomically(DumpResults(out_file_path=args.out)))
        metrics = runner.test()
    runner_setup.close_distributed()
    return metrics
