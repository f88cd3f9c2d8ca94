"""What the tools write, written so that a kill, a full disk or a second run loses nothing.

* :func:`atomic_output` / :func:`atomic_open`: a file is written under a temporary name in
  its own folder, flushed to the disk and renamed over its final name; until then the
  previous file (if any) is untouched, and after any failure the temporary file is gone.
* :func:`check_output_path`: at start-up, before any work, an output must be of the right
  kind (a file where a file is written, a folder where a folder is), writable (tried with a
  real file, so it also holds for root) and, where its size is known, fit the free space.
* :func:`lock_work_dir`: one training run per work dir; a second one is refused with the
  holder's pid, host, command and start time. The kernel drops the lock when its holder
  dies, so a lock left by a killed run does not block.

docs/design.md, "What a kill or a full disk leaves", says what is guaranteed.
"""
import atexit
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import IO, Dict, Iterator, Optional

# Temporary files carry this marker, so that they are recognisable as never-complete.
TEMPORARY_MARK = '.tmp-'
LOCK_NAME = '.rest_mm_train.lock'
# The work dirs this process holds (by real path): a tool run twice in one process (tests,
# tools/main_job.py) is one holder, not two runs.
_HELD: Dict[str, 'WorkDirLock'] = {}


class OutputError(OSError):
    """An output that cannot be written: wrong kind, not writable, too little space, or a
    write that failed (full disk). The message is one line naming the path."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class WorkDirBusy(OutputError):
    """A work dir that a live training run holds."""


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (on file systems that allow it)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # some file systems (e.g. some FUSE mounts) refuse fsync on a folder
        pass
    finally:
        os.close(handle)


def _new_file_mode(path: str) -> int:
    """The permissions the file would get from a plain ``open(path, 'w')``: the replaced
    file's, or the default under the umask (mkstemp's own are 0600)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def describe_os_error(error: OSError, path: str, what: str = 'write') -> str:
    """One line for an ``OSError`` met writing ``path``, with what to do for the usual
    causes (full disk, read-only or forbidden folder).

    Args:
        error (OSError): What the write raised.
        path (str): The file being written, as the user named it.
        what (str): The action, e.g. ``'save checkpoint'``. Defaults to ``'write'``.

    Returns:
        str: ``cannot WHAT PATH: REASON; HINT``.
    """
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = 'free some space (or choose another disk) and run again'
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = 'choose a folder you can write to'
    else:
        hint = 'check the path'
    return f'cannot {what} {path}: {reason}; {hint}'


@contextmanager
def atomic_output(path: str, what: str = 'write',
                  keep_extension: bool = True) -> Iterator[str]:
    """Write ``path`` whole or not at all.

    Yields the name of a temporary file beside ``path``, by default with the same extension
    (tools that pick the format from it, such as matplotlib and OpenCV, see the right one);
    write it
    by name. When the block ends normally the file is flushed to the disk and renamed over
    ``path`` (a symbolic link's target is replaced, as ``open`` would write it), then the
    rename itself is flushed. When the block raises, or the write fails, the temporary
    file is removed, ``path`` is as it was, and an ``OSError`` becomes an
    :class:`OutputError` with a one-line message. A process killed meanwhile leaves at
    most a hidden ``.NAME.tmp-*`` file, which nothing reads.

    Args:
        path (str): The file to write. Its folder is created if missing.
        what (str): The action for error messages, e.g. ``'save checkpoint'``. Defaults to
            ``'write'``.
        keep_extension (bool): End the temporary name with ``path``'s extension. False for
            files that others find by extension (checkpoints: ``*.pth``), so that a killed
            write's leftover never looks like one. Defaults to True.

    Yields:
        str: The temporary file to write to.
    """
    target = os.path.realpath(os.fspath(path))
    folder, name = os.path.split(target)
    stem, extension = os.path.splitext(name)
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=folder, prefix=f'.{stem if keep_extension else name}{TEMPORARY_MARK}',
            suffix=extension if keep_extension else '')
        os.close(handle)
    except OSError as error:
        raise OutputError(error.errno, describe_os_error(error, path, what)) from error
    try:
        yield temporary
        mode = _new_file_mode(target)
        with open(temporary, 'rb+') as written:
            os.fsync(written.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except OSError as error:
        if isinstance(error, OutputError):
            raise
        raise OutputError(error.errno, describe_os_error(error, path, what)) from error
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)
    _fsync_folder(folder)


@contextmanager
def atomic_open(path: str, mode: str = 'w', what: str = 'write', **kwargs) -> Iterator[IO]:
    """:func:`atomic_output` as an open file: ``with atomic_open(path) as f: json.dump(x, f)``.

    Args:
        path (str): The file to write.
        mode (str): ``'w'`` (text) or ``'wb'``. Defaults to ``'w'``.
        what (str): The action for error messages. Defaults to ``'write'``.
        **kwargs: More arguments of ``open`` (``encoding``, ``newline``).
    """
    if mode not in ('w', 'wb'):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', got {mode!r}")
    with atomic_output(path, what) as temporary:
        with open(temporary, mode, **kwargs) as file:
            yield file
            file.flush()


def _existing_ancestor(path: str) -> str:
    """The nearest folder-or-file on the way up from ``path`` that exists."""
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _try_writing_in(folder: str, path: str, option: str) -> None:
    """Create and remove a file in ``folder``: the only test of writability that holds
    for root, read-only mounts and ACLs alike."""
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=f'.write-check{TEMPORARY_MARK}')
    except OSError as error:
        raise OutputError(error.errno, f'{option} {path}: the folder {folder} is not writable '
                          f'({error.strerror or error}); choose a folder you can write to'
                          ) from error
    os.close(handle)
    os.remove(probe)


def check_output_path(path: str, kind: str = 'file', needed_bytes: Optional[int] = None,
                      option: str = 'output') -> None:
    """Refuse, before any work, an output that could not be written.

    Checked: ``path`` is not of the other kind (a folder where a file is written, or a
    file where a folder is); the folder that will hold it (or, when folders are still to
    be created, the nearest existing one) is a folder and a file can really be created in
    it; and, when ``needed_bytes`` is given, that the disk has that much free space.
    Nothing is left behind: folders to be created are not created.

    Args:
        path (str): The file or folder the tool will write.
        kind (str): ``'file'`` or ``'dir'``. Defaults to ``'file'``.
        needed_bytes (int, optional): How much will be written, where known. Defaults to
            None (not checked).
        option (str): How the user named the output (e.g. ``'--out'``), for the message.
            Defaults to ``'output'``.

    Raises:
        OutputError: naming the path and what is wrong with it.
    """
    if kind not in ('file', 'dir'):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    path = os.fspath(path)
    if not path:
        raise OutputError(errno.ENOENT, f'{option}: an empty path; give a {kind} name')
    resolved = os.path.realpath(path)
    if kind == 'file' and os.path.isdir(resolved):
        raise OutputError(errno.EISDIR, f'{option} {path} is a folder; give a file name')
    if kind == 'dir' and os.path.exists(resolved) and not os.path.isdir(resolved):
        raise OutputError(errno.ENOTDIR, f'{option} {path} is a file, not a folder; give a '
                          f'folder name')
    holder = resolved if kind == 'dir' and os.path.isdir(resolved) else \
        _existing_ancestor(os.path.dirname(resolved))
    if not os.path.isdir(holder):
        raise OutputError(errno.ENOTDIR, f'{option} {path}: {holder} is a file, not a folder, '
                          f'so nothing can be written under it')
    _try_writing_in(holder, path, option)
    if needed_bytes is not None:
        # A file it replaces is freed only after the rename: the whole size must fit.
        free = shutil.disk_usage(holder).free
        if free < needed_bytes:
            raise OutputError(errno.ENOSPC, f'{option} {path}: {needed_bytes / 1e6:.1f} MB '
                              f'will be written and only {free / 1e6:.1f} MB are free on its '
                              f'disk; free some space or choose another disk')


# ---------------------------------------------------------------------------------------
# One training run per work dir.
# ---------------------------------------------------------------------------------------
def _launch_rank() -> int:
    """This process's rank as the launchers set it (0 without a launcher)."""
    for variable in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'):
        if os.environ.get(variable, '').isdigit():
            return int(os.environ[variable])
    return 0


def _holder_details(lock_file: IO) -> str:
    lock_file.seek(0)
    text = lock_file.read()
    try:
        holder = json.loads(text)
        return (f'pid {holder["pid"]} on {holder["host"]}, started {holder["started"]}: '
                f'{holder["command"]}')
    except (ValueError, KeyError, TypeError):
        return 'a process that has not written its details yet'


class WorkDirLock:
    """An exclusive ``flock`` on ``LOCK_NAME`` in a work dir, see :func:`lock_work_dir`."""

    def __init__(self, work_dir: str, tool: str):
        self.work_dir = work_dir
        self.path = os.path.join(work_dir, LOCK_NAME)
        self.created_work_dir = not os.path.isdir(work_dir)
        os.makedirs(work_dir, exist_ok=True)
        while True:
            self.file = open(self.path, 'a+')
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_details(self.file)
                self.file.close()
                raise WorkDirBusy(errno.EBUSY, f'{tool}: the work dir {work_dir} is in use by '
                                  f'another training run ({holder}); wait for it to end, or '
                                  f'give this run another --work-dir') from None
            # The file may have been removed by a holder ending between our open and our
            # flock; then the lock we hold is on a file nobody else will see: try again.
            try:
                if os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self.file.close()
        self.file.seek(0)
        self.file.truncate()
        json.dump(dict(pid=os.getpid(), host=socket.gethostname(),
                       command=' '.join([os.path.basename(sys.executable), *sys.argv]),
                       started=time.strftime('%Y-%m-%d %H:%M:%S %Z')), self.file)
        self.file.flush()

    def release(self) -> None:
        """Remove the lock file (still holding the lock, so nobody takes a file that is
        being removed), unlock, and remove the work dir if this lock created it and
        nothing else was written there."""
        if self.file.closed:
            return
        _HELD.pop(os.path.realpath(self.work_dir), None)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self.file.close()
        if self.created_work_dir:
            try:
                os.rmdir(self.work_dir)
            except OSError:  # not empty: the run wrote there
                pass


def lock_work_dir(work_dir: str, tool: str = 'tools/train.py') -> Optional[WorkDirLock]:
    """Hold ``work_dir`` for this run until the process ends.

    Only rank 0 of a distributed run takes the lock (all ranks share the work dir); a
    process that holds it already gets its lock back. The lock is released when the
    process exits, by the kernel if it is killed; the lock file is removed at a normal exit.

    Args:
        work_dir (str): The run's work dir; created if missing (and removed again at exit
            if the run wrote nothing there).
        tool (str): The tool's name for the message. Defaults to ``'tools/train.py'``.

    Returns:
        WorkDirLock or None: the lock (None on other ranks).

    Raises:
        WorkDirBusy: a live process holds the work dir; the message names it.
    """
    if _launch_rank() != 0:
        return None
    key = os.path.realpath(work_dir)
    if key not in _HELD:
        _HELD[key] = WorkDirLock(work_dir, tool)
        atexit.register(_HELD[key].release)
    return _HELD[key]


def written_atomically(metric, attribute: str = 'out_file_path'):
    """Make an evaluator metric that dumps to a file (mmengine's ``DumpResults``, mmdet's
    ``DumpDetResults``) write it atomically: its ``compute_metrics``, which mmengine calls on
    rank 0 only, writes to a temporary file that replaces the output when complete.

    Args:
        metric (BaseMetric): The metric, changed in place.
        attribute (str): The attribute naming its output file. Defaults to
            ``'out_file_path'``.

    Returns:
        BaseMetric: ``metric``.
    """
    compute = metric.compute_metrics
    final = getattr(metric, attribute)

    def compute_metrics(results):
        with atomic_output(final) as temporary:
            setattr(metric, attribute, temporary)
            try:
                return compute(results)
            finally:
                setattr(metric, attribute, final)

    metric.compute_metrics = compute_metrics
    return metric
