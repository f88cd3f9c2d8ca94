"""Reading checkpoint files: integrity first, and nothing but data.

:func:`read_checkpoint` reads a path or URL. Three kinds of local file are read
(:func:`read_local_checkpoint`):

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

torch files (both formats) are unpickled by :data:`restricted_pickle`, the same way on every
torch of the supported range: only the globals that :func:`checkpoint_globals` lists may be
named (torch's tensors and their metadata, numpy arrays and scalars, builtin containers,
and the types mmengine's training checkpoints hold); any other name is refused before it is
imported, so nothing in the file runs. torch's own ``weights_only`` loader is not used for
this because its allow-list, and the means to extend it, change from one torch to the next
(torch 2.1 has no ``add_safe_globals`` and no bfloat16 in the list). TorchScript archives,
which ``torch.load`` would hand to ``torch.jit.load``, and torch's pre-1.6 tar format are
refused.
"""
import _compat_pickle
import collections
import functools
import importlib
import os
import os.path as osp
import pickle
import tarfile
import types
import urllib.parse
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader

from ..torch_compat import load_defaults_to_weights_only, tensor_pickle_globals
from .state_dicts import CheckpointError

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


class CheckpointFileError(CheckpointError):
    """A checkpoint file that is damaged, of an unknown kind, or asks to run code."""


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list (it is never imported)."""


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
        module, name = python3_name(module, name)
        target = _NUMPY_PICKLE_GLOBALS.get((module, name))
        if target is None:
            raise RefusedGlobalError(
                f'the pickle asks for {module}.{name}; only numpy arrays, dtypes, scalars and '
                f'builtin containers are read from a plain pickle (anything else could run '
                f'code while loading)')
        return _numpy_pickle_global(target)


def python3_name(module: str, name: str) -> Tuple[str, str]:
    """The Python 3 name of a global that a protocol 0-2 pickle names (torch.save writes
    protocol 2, which spells ``builtins.getattr`` as ``__builtin__.getattr``), as pickle's
    own ``find_class`` renames it."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _numpy_pickle_global(target) -> Any:
    """The object at a value of ``_NUMPY_PICKLE_GLOBALS``."""
    owner, attribute = target
    if owner in ('multiarray', 'numeric'):
        return getattr(_numpy_core_module(owner), attribute)
    return getattr(importlib.import_module(owner), attribute)


@functools.lru_cache(maxsize=None)
def checkpoint_globals() -> Dict[str, Any]:
    """Every global a torch checkpoint may name, keyed ``'module.name'`` as pickles name them.

    torch's tensors and their metadata (:func:`rest_mm.torch_compat.tensor_pickle_globals`),
    the numpy names a plain numpy pickle may hold (under numpy 1's and numpy 2's module
    names), the types of mmengine's training checkpoints (:func:`checkpoint_safe_globals`,
    with ``builtins.getattr`` standing for :func:`_history_buffer_method`), and the builtin
    containers and scalars that pickle builds through a global (``set``, ``frozenset``,
    ``bytearray``, ``complex``; ``bytes`` through ``_codecs.encode``).
    """
    allowed = dict(tensor_pickle_globals())
    allowed.update({f'{module}.{name}': _numpy_pickle_global(target)
                    for (module, name), target in _NUMPY_PICKLE_GLOBALS.items()})
    for entry in checkpoint_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (
            entry, f'{entry.__module__}.{entry.__qualname__}')
        allowed[name] = obj
    allowed.update({f'builtins.{t.__name__}': t for t in (set, frozenset, bytearray, complex)})
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of :func:`checkpoint_globals`.

    A pickle reaches code only through the globals it names (every callable that it calls
    or class that it builds is one), so refusing every other name here, before anything is
    imported, keeps a file from running anything.
    """

    def find_class(self, module: str, name: str) -> Any:
        module, name = python3_name(module, name)
        found = checkpoint_globals().get(f'{module}.{name}')
        if found is None:
            raise RefusedGlobalError(
                f'the pickle asks for {module}.{name}; a checkpoint may hold only torch '
                f'tensors and their metadata, numpy arrays, builtin containers and the '
                'training state mmengine saves (anything else could run code while loading)')
        return found


def _restricted_load(file, **kwargs) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


#: A pickle module for ``torch.load(..., weights_only=False, pickle_module=restricted_pickle)``:
#: torch unpickles each record with a subclass of its ``Unpickler`` (storages named by type
#: become torch's ``StorageType``; every other name goes to :class:`RestrictedUnpickler`) and
#: reads a legacy file's headers with its ``load``.
restricted_pickle = types.ModuleType(
    'rest_mm.weights.files.restricted_pickle',
    'pickle, resolving only the globals of rest_mm.weights.files.checkpoint_globals()')
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load


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
        CheckpointFileError: A damaged zip, a file that is no checkpoint, a TorchScript
            archive or a pre-1.6 tar file, or a pickle that names a global outside
            :func:`checkpoint_globals` (numpy and builtin types only, for a plain pickle).
    """
    with open(path, 'rb') as file:
        is_zip = file.read(len(_ZIP_SIGNATURE)) == _ZIP_SIGNATURE
    if is_zip:
        verify_zip_checksums(path)
        _refuse_torchscript(path)
        return _torch_load(path, map_location, mmap=mmap)
    if tarfile.is_tarfile(path):
        raise CheckpointFileError(
            f'checkpoint {path!r} is in torch\'s pre-1.6 tar format, which is not read (it '
            f'cannot be checked, and torch\'s own weights-only loader refuses it too); load '
            f'it with torch 1.x and save it again with torch.save')
    try:
        with open(path, 'rb') as file:
            first = NumpyOnlyUnpickler(file).load()
    except RefusedGlobalError as error:
        raise CheckpointFileError(f'checkpoint {path!r} was refused: {error}') from error
    except pickle.UnpicklingError as error:
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
        return _torch_load(path, map_location)
    return first


def download_checkpoint(url: str) -> str:
    """The local copy of the checkpoint at an http(s) ``url``, so that it is read like any
    local file: ``<torch hub dir>/checkpoints/<file name>``, where mmengine's loader caches
    its downloads too. Downloaded once, by rank 0 first in a distributed run.

    Args:
        url (str): An ``http://`` or ``https://`` address ending in the file's name.

    Returns:
        str: The path of the local copy.

    Raises:
        CheckpointFileError: The URL names no file, or the download failed.
    """
    from mmengine.dist import barrier, get_dist_info
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise CheckpointFileError(f'checkpoint URL {url!r} names no file (its path ends in '
                                  f'"/"); give the address of the checkpoint file itself')
    local = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
    rank, world_size = get_dist_info()
    if rank == 0 and not os.path.isfile(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, local, progress=False)  # via a temporary file
        except (OSError, ValueError) as error:  # urllib's errors are OSErrors
            raise CheckpointFileError(f'checkpoint {url!r} could not be downloaded '
                                      f'({type(error).__name__}: {error})') from error
    if world_size > 1:
        barrier()
    return local


def _why_not_a_file(path: str) -> str:
    try:
        os.stat(path)
    except OSError as error:
        if osp.islink(path):  # a loop or a dangling link: "does not exist" would mislead
            return f'is a symbolic link that leads to no file ({error.strerror})'
        return 'does not exist'
    return 'is not a regular file'


def read_checkpoint(path: str, map_location: Optional[str] = 'cpu',
                    mmap: bool = False) -> Mapping:
    """Read a checkpoint file (or URL), verified, with a clear error for a bad one.

    A local file is read by :func:`read_local_checkpoint`: a
    torch zip file's CRC-32s are all checked before it is unpickled (damaged bytes are an
    error, not wrong weights); a legacy (non-zip) torch file and a plain pickle carry no
    checksum, so damage inside their tensors cannot be detected; a plain pickle (a
    detectron2 ``.pkl`` model) may hold only numpy arrays and builtin containers, whose
    values stay numpy arrays. torch files are unpickled with an allow-list (tensors, numpy,
    builtin containers and the types mmengine's training checkpoints pickle, so a detector
    or segmentor trained with this repo reads too), the same on every supported torch.
    http(s) URLs are downloaded once (:func:`download_checkpoint`)
    and read as local files; other schemes (``open-mmlab://``, ``s3://``, ...) are read by
    mmengine's loader, through ``torch.load``, which is weights-only from torch 2.6 only.

    Args:
        path (str): A file path or URL.
        map_location (str, optional): Where tensors go. Defaults to ``'cpu'``.
        mmap (bool): Map a zip file's tensor data instead of reading it (for a look at
            keys and shapes). Defaults to False.

    Raises:
        FileNotFoundError: No such file, or a directory.
        CheckpointError: A damaged or unreadable file, or one that holds no dict.
    """
    allow_mmengine_checkpoints()
    if path.startswith(('http://', 'https://')):
        path = download_checkpoint(path)
    remote = '://' in path
    if not remote and osp.isdir(path):
        raise FileNotFoundError(f'checkpoint {path!r} is a directory, not a file; pass the '
                                f'checkpoint file inside it')
    if not remote and not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} {_why_not_a_file(path)}')
    try:
        if remote:
            checkpoint = CheckpointLoader.load_checkpoint(path, map_location=map_location)
        else:
            checkpoint = read_local_checkpoint(path, map_location=map_location, mmap=mmap)
    except FileNotFoundError as error:
        raise FileNotFoundError(f'checkpoint {path!r} does not exist') from error
    except CheckpointFileError:
        raise
    except Exception as error:  # torch raises several unrelated types for bad files
        raise CheckpointError(f'checkpoint {path!r} could not be read ({type(error).__name__}: '
                              f'{error}); expected a file written by torch.save holding a '
                              f'state dict') from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, '
                              f'expected a state dict or a dict wrapping one')
    return checkpoint


def _refuse_torchscript(path: str) -> None:
    """``torch.load`` hands a TorchScript archive (a zip with ``constants.pkl``) to
    ``torch.jit.load``, which no pickle module restricts: refuse it."""
    with zipfile.ZipFile(path) as archive:
        if any(name.split('/', 1)[-1] == 'constants.pkl' for name in archive.namelist()):
            raise CheckpointFileError(
                f'checkpoint {path!r} is a TorchScript archive (torch.jit.save), not a '
                f'checkpoint; its code is not loaded. Load it with torch.jit.load if you '
                f'trust it, and save its state_dict() with torch.save')


def _torch_load(path: str, map_location: Optional[str], mmap: bool = False) -> Any:
    """``torch.load`` through :data:`restricted_pickle`; a refused global is an error
    naming the file."""
    try:
        # weights_only=False because torch accepts a pickle_module only then; the module
        # restricts more uniformly than torch's own weights-only loader
        return torch.load(path, map_location=map_location, weights_only=False,
                          pickle_module=restricted_pickle, mmap=mmap)
    except RefusedGlobalError as error:
        raise CheckpointFileError(f'checkpoint {path!r} was refused: {error}') from error


def _history_buffer_method(owner, name: str):
    """Stands in for ``builtins.getattr`` while unpickling: HistoryBuffer methods only."""
    allowed = set(_DEFAULT_STATISTICS) | set(HistoryBuffer._statistics_methods)
    if owner is not HistoryBuffer or name not in allowed:
        raise RefusedGlobalError(
            f'checkpoint asks for getattr({owner!r}, {name!r}); only HistoryBuffer statistics '
            f'methods ({", ".join(sorted(allowed))}) are allowed in a checkpoint')
    return getattr(HistoryBuffer, name)


def checkpoint_safe_globals() -> List[object]:
    """The globals that mmengine 0.10.7's checkpoints pickle besides tensors and dicts."""
    import numpy as np
    multiarray = _numpy_core_module('multiarray')
    # Unpickling a dtype builds an instance of its class (numpy.dtypes.Float64DType, ...),
    # so the classes of the numeric dtypes are allowed too.
    numeric_dtype_classes = [type(np.dtype(code)) for code in '?bBhHiIlLqQefdgFDG']
    return [
        HistoryBuffer,
        (_history_buffer_method, 'builtins.getattr'),
        np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar,
        *numeric_dtype_classes,
        collections.Counter,  # MultiStepLR's milestones in param scheduler states
    ]


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine's own checkpoints.

    For mmengine's own ``torch.load`` calls (``load_from``, ``resume``, ``open-mmlab://``
    and other non-http schemes); rest_mm's reader does not need it (it allows
    :func:`checkpoint_globals`). mmengine 0.10.7 calls ``torch.load`` without
    ``weights_only``, which torch >= 2.6 turns on, and its message hub pickles
    ``HistoryBuffer`` objects (numpy arrays inside, and statistics methods pickled as
    ``getattr(HistoryBuffer, 'mean')``). Exactly those types are allowed; ``getattr``
    resolves to :func:`_history_buffer_method`, which returns HistoryBuffer's statistics
    methods only (a free ``getattr`` would reach anything).
    Idempotent; :func:`read_checkpoint` and the tools call it before
    anything is loaded or resumed. A no-op before torch 2.6, whose ``torch.load`` is not
    weights-only by default (so mmengine's calls unpickle anything there; the tools read
    every local checkpoint with :func:`read_local_checkpoint` before mmengine does).
    """
    if load_defaults_to_weights_only():
        torch.serialization.add_safe_globals(checkpoint_safe_globals())
