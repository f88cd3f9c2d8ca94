"""mmengine's ``CheckpointHook`` made safe against a kill or a full disk while it saves.

mmengine 0.10's hook removes the oldest kept checkpoint *before* it writes the next one
(``max_keep_ckpts``), removes the previous best one before writing the new best, and writes
both the checkpoint and ``last_checkpoint`` in place: a run killed, or a disk that fills,
during a save can leave no complete checkpoint to resume from, or a truncated one that
``--resume`` would trust. :class:`AtomicCheckpointHook` keeps every option of the hook and
changes only the order and the way files are written: each checkpoint and
``last_checkpoint`` is written to a temporary file and renamed
(:func:`rest_mm.cli.safe_files.atomic_output`), and a checkpoint is removed only after its
successor and ``last_checkpoint`` are complete. :func:`use_atomic_checkpoints` puts it in
place of ``CheckpointHook`` in any config our tools run. Importing this module registers it
in mmengine's HOOKS.
"""
import glob
import os
import os.path as osp
from contextlib import contextmanager
from typing import Iterator, List, Set, Tuple

from mmengine.config import Config, ConfigDict
from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

from rest_mm.cli.safe_files import TEMPORARY_MARK, OutputError, atomic_open, atomic_output

_MMENGINE_NAMES = ('CheckpointHook', 'mmengine.CheckpointHook', CheckpointHook)


class _DeferredRemovals:
    """A file backend whose ``remove``/``rmtree`` are recorded, not done, until
    :meth:`run`; everything else goes to the real backend."""

    def __init__(self, backend):
        self.backend = backend
        self.pending: List[Tuple[str, str]] = []
        self.saved: Set[str] = set()

    def remove(self, path) -> None:
        self.pending.append(('remove', path))

    def rmtree(self, path) -> None:
        self.pending.append(('rmtree', path))

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self) -> None:
        for action, path in self.pending:
            if osp.realpath(path) not in self.saved:  # never the file just written
                getattr(self.backend, action)(path)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` (same arguments) that never leaves the work dir without a complete
    checkpoint: saves go to a temporary file renamed into place, ``last_checkpoint`` is
    replaced atomically, and outdated checkpoints (``max_keep_ckpts``, the previous best)
    are removed only after the new one is complete. A save that fails (full disk) raises
    an ``OSError`` with a one-line message and leaves the previous checkpoints as they were.
    Checkpoints written to a remote backend (``out_dir`` with ``://``) cannot be renamed
    atomically; they get the safe order of removals only."""

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if self._local() and is_main_process():
            # Saves a killed run left unfinished: never complete, never read; one run per
            # work dir (tools/train.py's lock), so none of them is being written now.
            for folder in {self.out_dir, runner.work_dir}:
                for unfinished in glob.glob(osp.join(glob.escape(folder),
                                                     f'.*{TEMPORARY_MARK}*')):
                    os.remove(unfinished)

    def _local(self) -> bool:
        return isinstance(getattr(self, 'file_backend', None), LocalBackend)

    @contextmanager
    def _safe_saving(self, runner) -> Iterator[_DeferredRemovals]:
        """Within: the runner saves atomically and this hook's removals wait until the
        block has ended without an error. Re-entrant (the best-checkpoint save calls the
        regular one)."""
        if isinstance(self.file_backend, _DeferredRemovals):
            yield self.file_backend
            return
        local = self._local()
        deferred = _DeferredRemovals(self.file_backend)
        self.file_backend = deferred
        save = runner.save_checkpoint

        def save_safely(out_dir, filename, *args, **kwargs):
            target = osp.join(out_dir, filename)
            deferred.saved.add(osp.realpath(target))
            if not local or not is_main_process():  # mmengine writes on rank 0 only
                return save(out_dir, filename, *args, **kwargs)
            try:
                with atomic_output(target, 'save checkpoint', keep_extension=False) as temporary:
                    save(osp.dirname(temporary), osp.basename(temporary), *args, **kwargs)
            except OutputError as error:
                raise OutputError(error.errno, f'{error}; the checkpoints saved before it '
                                  f'are intact (tools/train.py --resume continues from the '
                                  f'last one)') from error

        runner.save_checkpoint = save_safely
        try:
            yield deferred
        finally:
            self.file_backend = deferred.backend
            runner.__dict__.pop('save_checkpoint', None)
        deferred.run()

    def _save_best_checkpoint(self, runner, metrics) -> None:
        with self._safe_saving(runner):
            super()._save_best_checkpoint(runner, metrics)

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        # mmengine's bookkeeping of kept checkpoints, in its order, with the removal left to
        # the end of _safe_saving; then the save and an atomic last_checkpoint.
        with self._safe_saving(runner) as backend:
            if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids
                                                and self.keep_ckpt_ids[-1] == step):
                if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                    outdated = self.keep_ckpt_ids.popleft()
                    if is_main_process():
                        path = backend.join_path(self.out_dir,
                                                 self.filename_tmpl.format(outdated))
                        if backend.isfile(path):
                            backend.remove(path)
                        elif backend.isdir(path):  # deepspeed saves folders
                            backend.rmtree(path)
                self.keep_ckpt_ids.append(step)
                runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
            filename = self.filename_tmpl.format(step)
            self.last_ckpt = backend.join_path(self.out_dir, filename)
            runner.message_hub.update_info('last_ckpt', self.last_ckpt)
            runner.save_checkpoint(self.out_dir, filename, self.file_client_args,
                                   save_optimizer=self.save_optimizer,
                                   save_param_scheduler=self.save_param_scheduler, meta=meta,
                                   by_epoch=self.by_epoch, backend_args=self.backend_args,
                                   **self.args)
            if is_main_process():
                with atomic_open(osp.join(runner.work_dir, 'last_checkpoint'),
                                 what='write') as file:
                    file.write(self.last_ckpt)


def _is_mmengine_checkpoint_hook(hook) -> bool:
    return isinstance(hook, dict) and hook.get('type') in _MMENGINE_NAMES


def use_atomic_checkpoints(cfg: Config) -> Config:
    """Save checkpoints with :class:`AtomicCheckpointHook` in ``cfg`` (changed in place):
    mmengine's ``CheckpointHook`` in ``default_hooks`` or ``custom_hooks`` is replaced,
    keeping its options, and a config without a checkpoint hook gets it in place of the
    one mmengine's Runner would add (``interval=1``). ``default_hooks.checkpoint=None``
    (no checkpoints) and hooks of other types are left as they are.

    Returns:
        Config: ``cfg``.
    """
    if cfg.get('default_hooks') is None:
        cfg.default_hooks = ConfigDict()
    default_hooks = cfg.default_hooks
    if 'checkpoint' not in default_hooks:
        default_hooks['checkpoint'] = ConfigDict(type='AtomicCheckpointHook', interval=1)
    hooks = [default_hooks['checkpoint'], *(cfg.get('custom_hooks') or [])]
    for hook in hooks:
        if _is_mmengine_checkpoint_hook(hook):
            hook['type'] = 'AtomicCheckpointHook'
    return cfg
