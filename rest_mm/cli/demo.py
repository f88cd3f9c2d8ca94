"""Run a detector or segmentor on images and draw what it predicts.

mmdet configs go through mmdet's ``DetInferencer``, mmseg configs through mmseg's
``MMSegInferencer``, each drawing with its library's visualiser. The checkpoint is read and
checked against the whole model first; without one the weights are random and nothing is
downloaded. In a folder, an image that cannot be read or run is reported and skipped, and
the tool exits with status 1 at the end.
"""
import argparse
import glob
import sys
import warnings
from pathlib import Path

import mmcv
import torch
from mmengine.config import Config
from rich.progress import track

# Importing rest_mm registers ResT/ResTV2 even if the config forgets custom_imports.
from rest_mm.cli import errors
from rest_mm.cli.checkpoint_checks import check_model_fits
from rest_mm.cli.config_overrides import add_override_arguments, apply_overrides
from rest_mm.cli.precision import cpu_bf16_note, run_network_in_amp
from rest_mm.cli.preflight import check_scope, refuse_output_over_inputs
from rest_mm.cli.safe_files import OutputError, atomic_output, check_output_path
from rest_mm.weights.files import allow_mmengine_checkpoints, read_checkpoint

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('inputs', help='an image file, or a folder whose images are all run')
    parser.add_argument('config', help='a detection (mmdet) or segmentation (mmseg) config')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='a whole detector/segmentor checkpoint trained with CONFIG; '
                        'without it the weights are random')
    parser.add_argument('--out-dir', required=True, help='folder for the drawn pictures')
    parser.add_argument('--device', default=None,
                        help='e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: the model runs under autocast, bfloat16 on a CPU '
                        '(fast only where it has amx_bf16 or avx512_bf16; the tool says '
                        'which), float16 on CUDA')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: lowest score drawn and counted (default 0.3)')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='segmentation: opacity of the class overlay (default 0.5)')
    add_override_arguments(parser, 'model.test_cfg.mode=whole')
    errors.add_debug_argument(parser)
    return parser.parse_args(argv)


def list_images(inputs: str):
    """The image files named by ``inputs``, sorted; a clear error when there are none."""
    path = Path(inputs)
    if path.is_dir():
        images = sorted(p for p in path.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise ValueError(f'{inputs} holds no image files (looked for '
                             f'{", ".join(IMAGE_SUFFIXES)})')
        return images
    if not path.is_file():
        raise FileNotFoundError(f'{inputs} is neither an image file nor a folder')
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f'{inputs} is not an image file (accepted: {", ".join(IMAGE_SUFFIXES)})')
    return [path]


def resolve_device(device):
    if device is None:
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {device}: this torch build sees no CUDA device; use cpu')
    return device


def dataset_meta_from_config(cfg: Config) -> dict:
    """Class names and palette of the config's test set (annotations are not read)."""
    from mmengine.registry import DATASETS
    dataset_cfg = cfg.test_dataloader.dataset.copy()
    dataset_cfg['lazy_init'] = True
    return dict(DATASETS.build(dataset_cfg).metainfo)


def build_inferencer(cfg: Config, library: str, checkpoint_path, device: str):
    """The library's inferencer, its classes taken from the checkpoint or else the config."""
    # The Runner's checkpoints pickle training state that torch's weights_only loader
    # refuses unless allowed; the inferencers load with it too.
    allow_mmengine_checkpoints()
    # verified (zip checksums) and read, tensor data mapped, before the inferencer
    checkpoint = read_checkpoint(checkpoint_path, mmap=True) if checkpoint_path else None
    with warnings.catch_warnings():
        # Both inferencers warn about random weights and fall back to COCO/Cityscapes
        # class names; we say the former ourselves and replace the latter below.
        warnings.filterwarnings('ignore', message='.*(randomly initialized|classes by default)')
        warnings.filterwarnings('ignore', message='dataset_meta or class names are not saved')
        if library == 'mmdet':
            from mmdet.apis import DetInferencer
            inferencer = DetInferencer(cfg, checkpoint_path, device=device, show_progress=False)
        else:
            from mmseg.apis import MMSegInferencer
            inferencer = MMSegInferencer(cfg, checkpoint_path, device=device)
            inferencer.show_progress = False
    if checkpoint is not None:
        # The inferencers load non-strictly and only log what did not fit.
        check_model_fits(inferencer.model, checkpoint, checkpoint_path)
    if checkpoint is None or 'dataset_meta' not in checkpoint.get('meta', {}):
        meta = dataset_meta_from_config(cfg)
        inferencer.model.dataset_meta = dict(classes=meta['classes'],
                                             palette=meta.get('palette') or 'random')
        inferencer.visualizer.dataset_meta = inferencer.model.dataset_meta
    return inferencer


def summarise(library: str, prediction, classes, score_thr: float) -> str:
    """One line: detections above the threshold, or the classes covering most pixels."""
    if library == 'mmdet':
        kept = sorted(((score, classes[label]) for score, label
                       in zip(prediction['scores'], prediction['labels'])
                       if score >= score_thr), reverse=True)
        top = ', '.join(f'{name} {score:.2f}' for score, name in kept[:5])
        return f'{len(kept)} objects with score >= {score_thr}' + (f': {top}' if top else '')
    labels, counts = torch.as_tensor(prediction).unique(return_counts=True)
    order = counts.argsort(descending=True)[:3]
    shares = [f'{classes[int(labels[i])]} {100 * int(counts[i]) / prediction.size:.0f}%'
              for i in order]
    return 'classes by area: ' + ', '.join(shares)


class UnreadableImage(ValueError):
    """An input file that does not decode as an image."""


def check_readable(path: Path) -> None:
    """Raise :class:`UnreadableImage` saying why when ``path`` does not decode."""
    try:
        image = mmcv.imread(str(path))
    except Exception as error:  # the decoders raise several unrelated types
        raise UnreadableImage(f'could not be read as an image ({type(error).__name__}: '
                              f'{error})') from error
    if image is None:
        raise UnreadableImage('could not be read as an image (empty, damaged or not an '
                              'image)')


def predict_and_draw(inferencer, library: str, image: str, options: dict):
    """The prediction for one image and the library visualiser's drawing (RGB).

    mmseg's prediction reaches its visualiser as a numpy array: mmseg 1.2.2 indexes the
    numpy picture with a torch mask, which numpy takes for the integer index 1 when the
    image has a single pixel (IndexError); with a numpy mask every size draws.
    """
    if library == 'mmdet':
        result = inferencer(image, return_vis=True, **options)
        return result['predictions'][0], result['visualization'][0]
    sample = inferencer(image, return_datasamples=True)
    labels = sample.pred_sem_seg.data.cpu().numpy()
    sample.pred_sem_seg.data = labels
    return labels[0], inferencer.visualize([image], [sample], return_vis=True, **options)[0]


@errors.handled
def main(argv=None):
    args = parse_args(argv)
    images = list_images(args.inputs)
    refuse_output_over_inputs(
        args.out_dir, {'input folder' if Path(args.inputs).is_dir() else 'input image':
                       args.inputs, 'config': args.config, 'checkpoint': args.checkpoint},
        '--out-dir', written=[glob.escape(image.name) for image in images])
    check_output_path(args.out_dir, 'dir', option='--out-dir')
    cfg = Config.fromfile(args.config)
    apply_overrides(cfg, args.cfg_options, args.cfg_new_keys, args.config)
    library = check_scope(cfg, args.config)
    device = resolve_device(args.device)
    if args.checkpoint is None:
        print('No checkpoint given: the weights are RANDOM, so the pictures show that the '
              'pipeline runs, not what the model predicts. Nothing is downloaded.')
    inferencer = build_inferencer(cfg, library, args.checkpoint, device)
    classes = inferencer.model.dataset_meta['classes']
    if args.amp:
        device_type = torch.device(device).type
        try:
            dtype = run_network_in_amp(inferencer.model, device_type)
        except ValueError as error:
            raise ValueError(f'--amp: {error}') from error
        print(f'--amp: the network runs in {dtype} autocast on {device_type}')
        if device_type == 'cpu':
            print(cpu_bf16_note())

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    call_kwargs = (dict(pred_score_thr=args.score_thr) if library == 'mmdet'
                   else dict(opacity=args.opacity))
    progress = track(images, description='Demo') if len(images) > 1 else images
    failed = []
    for image in progress:
        try:  # one bad image must not stop the others
            check_readable(image)
            prediction, drawn = predict_and_draw(inferencer, library, str(image), call_kwargs)
        except Exception as error:
            reason = error if isinstance(error, UnreadableImage) else \
                f'failed ({type(error).__name__}: {error})'
            print(f'{image}: {reason}; skipped', file=sys.stderr, flush=True)
            failed.append(image.name)
            continue
        out_file = out_dir / image.name
        try:  # whole pictures or none: a full disk stops the run, leaving no empty file
            with atomic_output(str(out_file)) as temporary:
                mmcv.imwrite(drawn[..., ::-1], temporary)  # visualisers return RGB
        except OutputError as error:
            raise OutputError(error.errno, f'{error} (the pictures before {image.name} are '
                              'complete)') from error
        print(f'{image.name}: {summarise(library, prediction, classes, args.score_thr)} '
              f'-> {out_file}')
    if failed:
        raise SystemExit(f'{len(failed)} of {len(images)} images failed and were skipped: '
                         f'{", ".join(failed)}')


if __name__ == '__main__':
    main()
