"""Generate the built-in shapes dataset (COCO and ADE20K layouts) for the toy configs.

Up-to-date data (same arguments) is left alone unless ``--force`` is given.
"""
import argparse
from dataclasses import fields

from rest_mm.cli import errors
from rest_mm.cli.safe_files import check_output_path
from rest_mm.cli.toy_data import ToyDataSpec, generate_toy_datasets


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out-dir', default='data',
                        help='receives toy_coco/ and toy_ade/ (default: data)')
    defaults = ToyDataSpec()
    for field in fields(ToyDataSpec):
        parser.add_argument('--' + field.name.replace('_', '-'), type=int,
                            default=getattr(defaults, field.name),
                            help=f'default: {getattr(defaults, field.name)}')
    parser.add_argument('--force', action='store_true', help='regenerate even if up to date')
    errors.add_debug_argument(parser)
    return parser.parse_args(argv)


@errors.handled
def main(argv=None):
    args = parse_args(argv)
    spec = ToyDataSpec(**{f.name: getattr(args, f.name) for f in fields(ToyDataSpec)})
    check_output_path(args.out_dir, 'dir', option='--out-dir')
    result = generate_toy_datasets(args.out_dir, spec, force=args.force)
    state = 'generated' if result['generated'] == 'yes' else 'already up to date'
    print(f'toy data {state}: {result["coco"]} (COCO, {spec.num_train} train / {spec.num_val} '
          f'val images) and {result["ade"]} (ADE20K layout)')


if __name__ == '__main__':
    main()
