"""How every tool stops on a user's mistake: one line on stderr and exit status 2.

Each tool's ``main`` is wrapped by :func:`handled`. A user error — a file, folder, key or
value the user gave that is wrong — is printed as ``tools/NAME.py: error: MESSAGE`` on one
line (the message names the file or key at fault) and the tool exits with status 2, as
argparse does for a bad option. ``--debug`` (:func:`add_debug_argument`, on every tool)
shows the traceback instead. Anything else is a bug of ours and keeps its stack.

What counts as a user error (:func:`is_user_error`):

* ``ValueError``, ``OSError`` (a missing file, a symbolic link loop, a full disk, a
  read-only folder; :class:`~rest_mm.cli.safe_files.OutputError` and ``WorkDirBusy`` are
  ``OSError``\\ s), ``SyntaxError`` (mmengine's for a config file), mmengine's
  ``ConfigParsingError``, :class:`~rest_mm.torch_compat.TorchVersionError`,
  :class:`~rest_mm.weights.state_dicts.CheckpointError` (a checkpoint the user gave that is
  damaged, not finite or does not fit) and :class:`UserError`;
* a ``KeyError`` whose message is a sentence (a preset, an arch, a registry type that does
  not exist); a bare ``KeyError('name')`` is a lookup in our code and stays a bug;
* any exception raised by a config file's own code as mmengine runs it (a ``NameError``
  in the config, say): the message names the file and line;
* a ``TypeError`` raised by mmengine's config code (a child config's value of another
  type than its base's) or where its registry calls a class with the config's keys (an
  argument the class does not take, from the config or ``--cfg-options``).
"""
import argparse
import functools
import os
import sys
from typing import Callable, List, Optional

from mmengine.config.utils import ConfigParsingError

from rest_mm.torch_compat import TorchVersionError
from rest_mm.weights.state_dicts import CheckpointError

# Where mmengine's TypeErrors are about a config: its config package, and where its registry
# calls a class with a config's keys (the callee's own TypeErrors are raised in its frame).
_CONFIG_CODE = os.path.join('mmengine', 'config', '')
_REGISTRY_BUILD = (os.path.join('mmengine', 'registry', 'build_functions.py'), 'build_from_cfg')
_USER_ERRORS = (ValueError, OSError, SyntaxError, ConfigParsingError, TorchVersionError,
                CheckpointError)


class UserError(Exception):
    """A mistake in the user's input that a tool found itself, e.g. a checkpoint that does
    not fit the model; the message says what and what is accepted."""


class ToolExit(SystemExit):
    """The exit after a user error, status 2; ``str()`` is the line printed, so that a
    caller (and a test) of ``main`` can read it."""

    def __init__(self, line: str):
        super().__init__(2)
        self.line = line

    def __str__(self) -> str:
        return self.line


class _DebugAction(argparse.Action):
    """``--debug``: recorded for :func:`handled` as the arguments are parsed, so that it
    holds whatever the tool's parser makes of the command line (abbreviations included)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        if _debug:  # parsed under a handled main (not by a test calling parse_args)
            _debug[-1] = True


# One entry per running handled ``main`` (a tool may run another's, e.g. the main job, whose
# ``--debug`` the inner tool inherits).
_debug: List[bool] = []


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """Give a tool's parser the ``--debug`` flag."""
    parser.add_argument('--debug', action=_DebugAction, nargs=0, default=False,
                        help='show the traceback of an error in the input (a missing file, '
                        'a wrong key or value) instead of one line')


def _innermost_frame(error: BaseException):
    """The frame that raised ``error`` (the last entry of its traceback), or None."""
    traceback = error.__traceback__
    if traceback is None:
        return None
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback.tb_frame


def _config_file_entry(error: BaseException):
    """The traceback entry of a config file's code when ``error`` was raised running it
    (mmengine's config package calls the file's ``<module>`` code), else None."""
    entry, caller = error.__traceback__, None
    while entry is not None:
        if (entry.tb_frame.f_code.co_name == '<module>' and caller is not None
                and _CONFIG_CODE in caller.tb_frame.f_code.co_filename):
            return entry
        entry, caller = entry.tb_next, entry
    return None


def _raised_by_config_code(error: BaseException) -> bool:
    frame = _innermost_frame(error)
    if frame is None:
        return False
    code = frame.f_code
    return (_CONFIG_CODE in code.co_filename
            or (code.co_name == _REGISTRY_BUILD[1]
                and code.co_filename.endswith(_REGISTRY_BUILD[0])))


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is about the user's input (see the module's docstring) rather
    than a bug of ours.

    Args:
        error (BaseException): What a tool raised.

    Returns:
        bool: True for a user error.
    """
    if isinstance(error, (UserError, *_USER_ERRORS)) or _config_file_entry(error) is not None:
        return True
    if isinstance(error, KeyError):
        return (len(error.args) == 1 and isinstance(error.args[0], str)
                and ' ' in error.args[0].strip())
    if isinstance(error, TypeError):
        return _raised_by_config_code(error)
    return False


def one_line(error: BaseException) -> str:
    """The message of a user error on one line, naming the file or key at fault.

    ``OSError``\\ s from the system become ``FILE: REASON``; a ``KeyError`` loses the
    quotes ``str()`` adds; the lines of a long message are joined with ``; ``.

    Args:
        error (BaseException): A user error.

    Returns:
        str: One line (never empty).
    """
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        message = f'{error.filename}: {error.strerror}'
        if error.filename2 is not None:
            message = f'{error.filename} -> {error.filename2}: {error.strerror}'
    elif isinstance(error, KeyError) and len(error.args) == 1:
        message = str(error.args[0])
    else:
        message = str(error)
    config_entry = _config_file_entry(error)
    if config_entry is not None:
        message = (f'{config_entry.tb_frame.f_code.co_filename}, line {config_entry.tb_lineno}: '
                   f'{type(error).__name__}: {message}')
    elif isinstance(error, TypeError):  # a value or key of the config
        message += ' (check the keys of the config and of --cfg-options)'
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return '; '.join(lines) or type(error).__name__


def handled(main: Callable) -> Callable:
    """Wrap a tool's ``main(argv=None)``: a user error becomes one line on stderr and
    :class:`ToolExit` (status 2), or its traceback under ``--debug``; any other exception
    passes unchanged.

    Args:
        main (Callable): The tool's entry point, in ``rest_mm/cli/NAME.py`` for
            ``tools/NAME.py``.

    Returns:
        Callable: The wrapped entry point.
    """
    tool = f'tools/{main.__module__.rsplit(".", 1)[-1]}.py'

    @functools.wraps(main)
    def wrapper(argv: Optional[List[str]] = None):
        _debug.append(bool(_debug) and _debug[-1])
        try:
            return main(argv)
        except Exception as error:
            if _debug[-1] or not is_user_error(error):
                raise
            line = f'{tool}: error: {one_line(error)}'
            print(line, file=sys.stderr, flush=True)
            raise ToolExit(line) from None
        finally:
            _debug.pop()

    return wrapper
