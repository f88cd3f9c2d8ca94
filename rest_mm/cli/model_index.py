"""The shipped configs' OpenMMLab model index, read in one place.

``model-index.yml`` imports ``configs/detection/metafile.yml`` and
``configs/segmentation/metafile.yml``; each model there names its config and holds this
repo's parameter and FLOP counts (``Parameters``, ``FLOPs``: what ``tools/get_flops.py``
prints), the authors' published figures where there are any (``Published Parameters``,
``Published FLOPs``, ``Results``) and the download of their trained model (``Weights``).
The tests, ``tools/get_flops.py`` and ``tools/make_docs.py`` read these numbers from here
instead of restating them.
"""
import re
from pathlib import Path
from typing import List, Optional

import yaml

REPO = Path(__file__).resolve().parents[2]
INDEX = 'model-index.yml'


def models(repo: Path = REPO) -> List[dict]:
    """Every model of the index, in the order of the metafiles.

    Args:
        repo (Path): The repository holding ``model-index.yml``. Defaults to this checkout.

    Returns:
        list[dict]: The model entries as the metafiles write them.

    Raises:
        FileNotFoundError: The index, or a metafile it imports, does not exist (the index
            ships with the repository, not with the installed package).
    """
    index_path = Path(repo) / INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f'{index_path} does not exist: the model index is read from '
                                f'a checkout of the repository')
    entries = []
    for metafile in yaml.safe_load(index_path.read_text())['Import']:
        path = Path(repo) / metafile
        if not path.is_file():
            raise FileNotFoundError(f'{INDEX} imports {metafile}, which does not exist')
        entries += yaml.safe_load(path.read_text())['Models']
    return entries


def _number(text, unit: str, field: str) -> float:
    match = re.fullmatch(r'(\d+(?:\.\d+)?)' + unit, str(text))
    if not match:
        raise ValueError(f'{field} {text!r} is not a number followed by {unit!r} '
                         f'(e.g. 23.4{unit})')
    return float(match[1])


def _metadata_number(model: dict, quantity: str, unit: str, published: bool) -> Optional[float]:
    """``model``'s ``quantity`` (``'Parameters'``, ``'FLOPs'``) in its metafile unit, the
    authors' published figure with ``published``; None where the metafile has none."""
    field = f'Published {quantity}' if published else quantity
    value = model['Metadata'].get(field)
    return None if value is None else _number(value, unit, f'{model["Name"]}: {field}')


def parameters(model: dict, published: bool = False) -> Optional[float]:
    """Millions of parameters of ``model`` (an entry of :func:`models`): this repo's count,
    or with ``published`` the authors' figure (None where they published none)."""
    return _metadata_number(model, 'Parameters', 'M', published)


def flops(model: dict, published: bool = False) -> Optional[float]:
    """GFLOPs (multiply-accumulates) of ``model`` at its standard test size, as
    :func:`parameters` gives its size."""
    return _metadata_number(model, 'FLOPs', 'G', published)
