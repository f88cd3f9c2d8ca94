"""Reading checkpoint files: integrity first, and nothing but data.

Three kinds of local file are read (:func:`read_local_checkpoint`):

* **torch's zip format** (``torch.save`` since torch 1.6): a zip archive whose entries each
  carry a CRC-32. Every entry is checked before anything is unpickled, so a file damaged
  on disk or in transfer (flipped bytes inside a tensor, a truncated download) is refused
  instead of loading wrong weights. torch itself does not check them.
* **torch's legacy format** (``_use_new_zipfile_serialization=False``, torch < 1.6):
  a sequence of pickles with raw storages. It has **no checksum**: damage inside a tensor
  cannot be detected, only damage that breaks the pickle structure.
* **plain pickles of numpy arrays**, as detectron2 publishes its models (``.pkl``:
  ``{'model': {name: ndarray}, '__author__': ...}``, some written by Python 2). A pickle
  has **no checksum** either. It is read by :class:`NumpyOnlyUnpickler`, which builds
  numpy arrays, dtypes and scalars and builtin containers, and refuses every other
  class or function the file names: a pickle can otherwise run any code while loading.
  Values stay numpy arrays; the converters turn them into tensors.

torch files are loaded with ``weights_only=True`` (mmengine's training-state types are
allow-listed by :func:`allow_mmengine_checkpoints`).
"""
import importlib
import pickle
import zipfile
from typing import Any, List, Optional

import torch
from mmengine.logging import HistoryBuffer

_DEFAULT_STATISTICS = ('min', 'max', 'current', 'mean')
# torch's legacy format starts with a pickled magic number (torch/serialization.py).
_LEGACY_TORCH_MAGIC = 0x1950a86a20f9469cfc6c
_ZIP_SIGNATURE = b'PK\x03\x04'
# (module, name) a numpy pickle may name -> where the object lives now. numpy 2 moved
# numpy.core to numpy._core; files written by either name the module they were written with.
_NUMPY_PICKLE_GLOBALS = {
    ('numpy', 'ndarray'): ('numpy', 'ndarray'),
    ('numpy', 'dtype'): ('numpy', 'dtype'),
    ('collections', 'OrderedDict'): ('collections', 'OrderedDict'),
    # Python 3's protocol 2 pickles bytes as _codecs.encode(text, 'latin1').
    ('_codecs', 'encode'): ('_codecs', 'encode'),
}
for _core in ('numpy.core', 'numpy._core'):
    _NUMPY_PICKLE_GLOBALS.update({
        (f'{_core}.multiarray', '_reconstruct'): ('multiarray', '_reconstruct'),
        (f'{_core}.multiarray', 'scalar'): ('multiarray', 'scalar'),
        (f'{_core}.numeric', '_frombuffer'): ('numeric', '_frombuffer'),
    })


class CheckpointFileError(RuntimeError):
    """A checkpoint file that is damaged, of an unknown kind, or asks to run code."""


def _numpy_core_module(name: str):
    """``numpy._core.<name>`` on numpy 2, ``numpy.core.<name>`` before."""
    try:
        return importlib.import_module(f'numpy._core.{name}')
    except ImportError:
        return importlib.import_module(f'numpy.core.{name}')


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, scalars and builtin containers, nothing else.

    Python 2 pickles (older detectron2 model files) are read with ``latin1``, as
    detectron2 reads them, so that their array bytes decode unchanged.
    """

    def __init__(self, file):
        super().__init__(file, encoding='latin1')

    def find_class(self, module: str, name: str) -> Any:
        target = _NUMPY_PICKLE_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f'the pickle asks for {module}.{name}; only numpy arrays, dtypes, scalars and '
                f'builtin containers are read from a plain pickle (anything else could run '
                f'code while loading)')
        owner, attribute = target
        if owner in ('multiarray', 'numeric'):
            return getattr(_numpy_core_module(owner), attribute)
        return getattr(importlib.import_module(owner), attribute)


def verify_zip_checksums(path: str) -> None:
    """Raise :class:`CheckpointFileError` unless every entry of the zip at ``path`` reads
    back with its recorded CRC-32 (and the archive itself is complete)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise CheckpointFileError(
            f'checkpoint {path!r} is damaged: its zip container cannot be read '
            f'({type(error).__name__}: {error}); the file is truncated or corrupt, '
            f'copy or download it again') from error
    if damaged is not None:
        raise CheckpointFileError(
            f'checkpoint {path!r} is damaged: the CRC-32 of its entry {damaged!r} does not '
            f'match its contents (the bytes changed after the file was written); copy or '
            f'download it again')


def read_local_checkpoint(path: str, map_location: Optional[str] = 'cpu',
                          mmap: bool = False) -> Any:
    """Read a local checkpoint file of any of the three kinds above.

    Args:
        path (str): An existing file.
        map_location (str, optional): Where torch tensors go. Defaults to ``'cpu'``.
        mmap (bool): Map a zip-format file's tensor data instead of reading it (cheap when
            only keys and shapes are needed). Defaults to False.

    Returns:
        The unpickled object (a dict for every checkpoint).

    Raises:
        CheckpointFileError: A damaged zip, a file that is no checkpoint, or a pickle that
            names anything but numpy and builtin types.
    """
    with open(path, 'rb') as file:
        is_zip = file.read(len(_ZIP_SIGNATURE)) == _ZIP_SIGNATURE
    if is_zip:
        verify_zip_checksums(path)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    try:
        with open(path, 'rb') as file:
            first = NumpyOnlyUnpickler(file).load()
    except pickle.UnpicklingError as error:
        if 'only numpy arrays' in str(error):
            raise CheckpointFileError(f'checkpoint {path!r} was refused: {error}') from error
        raise CheckpointFileError(
            f'checkpoint {path!r} could not be read: it is neither a torch checkpoint nor a '
            f'pickle ({error}); expected a file written by torch.save (or a detectron2 .pkl '
            f'model)') from error
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, UnicodeDecodeError, OverflowError) as error:
        # pickle raises any of these for bytes that are not a (complete) pickle
        raise CheckpointFileError(
            f'checkpoint {path!r} could not be read: it is neither a torch checkpoint nor a '
            f'pickle ({type(error).__name__}: {error}); expected a file written by torch.save '
            f'(or a detectron2 .pkl model)') from error
    if isinstance(first, int) and first == _LEGACY_TORCH_MAGIC:
        return torch.load(path, map_location=map_location, weights_only=True)
    return first


def _history_buffer_method(owner, name: str):
    """Stands in for ``builtins.getattr`` while unpickling: HistoryBuffer methods only."""
    allowed = set(_DEFAULT_STATISTICS) | set(HistoryBuffer._statistics_methods)
    if owner is not HistoryBuffer or name not in allowed:
        raise RuntimeError(
            f'checkpoint asks for getattr({owner!r}, {name!r}); only HistoryBuffer statistics '
            f'methods ({", ".join(sorted(allowed))}) are allowed when loading with '
            f'weights_only=True')
    return getattr(HistoryBuffer, name)


def checkpoint_safe_globals() -> List[object]:
    """The globals that mmengine 0.10.7's checkpoints pickle besides tensors and dicts."""
    import collections

    import numpy as np
    from numpy.core.multiarray import _reconstruct, scalar
    # Unpickling a dtype builds an instance of its class (numpy.dtypes.Float64DType, ...),
    # so the classes of the numeric dtypes are allowed too.
    numeric_dtype_classes = [type(np.dtype(code)) for code in '?bBhHiIlLqQefdgFDG']
    return [
        HistoryBuffer,
        (_history_buffer_method, 'builtins.getattr'),
        np.ndarray, np.dtype, _reconstruct, scalar, *numeric_dtype_classes,
        collections.Counter,  # MultiStepLR's milestones in param scheduler states
    ]


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine's own checkpoints.

    mmengine 0.10.7 calls ``torch.load`` without ``weights_only``, which torch >= 2.6 turns
    on, and its message hub pickles ``HistoryBuffer`` objects (numpy arrays inside, and
    statistics methods pickled as ``getattr(HistoryBuffer, 'mean')``). Exactly those types
    are allowed; ``getattr`` resolves to :func:`_history_buffer_method`, which returns
    HistoryBuffer's statistics methods only (a free ``getattr`` would reach anything).
    Idempotent; :func:`rest_mm.checkpoint.read_checkpoint` and the tools call it before
    anything is loaded or resumed.
    """
    torch.serialization.add_safe_globals(checkpoint_safe_globals())
