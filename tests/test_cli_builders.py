"""rest_mm/cli/builders.py: the one image-size parser of the tools."""
import argparse

import pytest

from rest_mm.cli.builders import parse_size


def test_parse_size_with_and_without_batch():
    assert parse_size('800x1344') == (800, 1344)
    assert parse_size('2x200x328', batch=True) == (2, 200, 328)
    assert parse_size('333X517', batch=True) == (1, 333, 517)
    refused = [('800', False, r"size '800' must look like 800x1344 \(HxW\)"),
               ('2x200x328', False, r'must look like 800x1344 \(HxW\)'),
               ('333by517', True, r'must look like 333x517 or 2x200x328 \(HxW or BxHxW\)'),
               ('1x2x3x4', True, r'\(HxW or BxHxW\)'),
               ('0x64', False, "size '0x64' must be positive"),
               ('0x64x64', True, 'must be positive')]
    for text, batch, message in refused:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse_size(text, batch=batch)
