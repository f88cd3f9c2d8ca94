"""rest_mm.weights.files: integrity checks, numpy-only pickles, the mmengine allow-list."""
import functools
import http.server
import os
import pickle
import tarfile
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub

from rest_mm import ResTV2, load_pretrained
from rest_mm.torch_compat import load_defaults_to_weights_only
from rest_mm.weights.files import CheckpointFileError, allow_mmengine_checkpoints, read_checkpoint


# ---------------------------------------------------------------------------------------
# Reading files: integrity, safe pickles, clear errors (issue 10).
# ---------------------------------------------------------------------------------------
def _reference_v2(reference_dir):
    return torch.load(reference_dir / 'rest_v2_tiny.pt', weights_only=True)['state_dict']


def test_damaged_zip_checkpoint_is_refused(tmp_path, reference_dir, reference_arch):
    """Bytes flipped inside a tensor's storage used to load silently (wrong weights);
    the zip container's CRC-32s catch them before anything is unpickled."""
    weights = _reference_v2(reference_dir)
    path = tmp_path / 'flipped.pth'
    torch.save({'model': weights}, path)
    data = bytearray(path.read_bytes())
    storage = weights['stem.proj.0.weight'].numpy().tobytes()
    at = bytes(data).find(storage)
    assert at > 0
    data[at + 7] ^= 0x40  # an exponent bit: one weight off by a factor of 2**64
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r'is damaged: the CRC-32 of its entry .*data/'):
        read_checkpoint(str(path))
    with pytest.raises(RuntimeError, match='is damaged'):
        load_pretrained(ResTV2(arch=reference_arch), str(path))

    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(bytes(data[:len(data) // 2]))
    with pytest.raises(RuntimeError, match='is damaged: its zip container cannot be read'):
        read_checkpoint(str(truncated))


def test_legacy_torch_format_still_reads(tmp_path, reference_dir, reference_arch):
    """torch's pre-1.6 format has no checksums (documented); it is read as before."""
    weights = _reference_v2(reference_dir)
    path = tmp_path / 'legacy.pth'
    torch.save({'model': weights}, path, _use_new_zipfile_serialization=False)
    model = ResTV2(arch=reference_arch)
    load_pretrained(model, str(path))
    torch.testing.assert_close(model.stem.norm.weight, weights['stem.norm.weight'])


@pytest.mark.parametrize('protocol', [2, 4])
def test_detectron2_pickle_reads_numpy_only(tmp_path, reference_dir, reference_arch, protocol):
    """detectron2's .pkl models (numpy arrays under 'model') are read, with numpy values,
    and load into the backbone; a pickle naming any other global is refused unrun."""
    weights = _reference_v2(reference_dir)
    path = tmp_path / 'model_final.pkl'
    with open(path, 'wb') as file:
        pickle.dump({'model': OrderedDict((f'backbone.bottom_up.{k}', v.numpy())
                                          for k, v in weights.items()),
                     '__author__': 'detectron2', 'matching_heuristics': True}, file,
                    protocol=protocol)
    loaded = read_checkpoint(str(path))
    value = loaded['model']['backbone.bottom_up.stem.norm.weight']
    assert isinstance(value, np.ndarray) and np.array_equal(value, weights['stem.norm.weight'])
    model = ResTV2(arch=reference_arch)
    load_pretrained(model, str(path))
    torch.testing.assert_close(model.stem.norm.weight, weights['stem.norm.weight'])

    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            return open, (str(marker), 'w')

    evil = tmp_path / 'evil.pkl'
    with open(evil, 'wb') as file:
        pickle.dump({'model': {'x': np.zeros(2)}, 'payload': Payload()}, file,
                    protocol=protocol)
    with pytest.raises(RuntimeError, match=r'refused: .*asks for (builtins|io)\.open'):
        read_checkpoint(str(evil))
    assert not marker.exists()


def test_unreadable_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='is a directory, not a file'):
        read_checkpoint(str(tmp_path))
    text = tmp_path / 'notes.txt'
    text.write_text('these are my notes, not weights\n')
    with pytest.raises(RuntimeError, match='neither a torch checkpoint nor a pickle'):
        read_checkpoint(str(text))


def test_links_to_nothing_are_named_as_links(tmp_path):
    loop, dangling = tmp_path / 'loop.pth', tmp_path / 'dangling.pth'
    loop.symlink_to(loop)
    dangling.symlink_to(tmp_path / 'gone.pth')
    for link in (loop, dangling):
        with pytest.raises(FileNotFoundError, match='is a symbolic link that leads to no file'):
            read_checkpoint(str(link))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        read_checkpoint(str(tmp_path / 'gone.pth'))


# allow_mmengine_checkpoints is for torch.load's own weights-only default (torch >= 2.6)
needs_weights_only_default = pytest.mark.skipif(
    not load_defaults_to_weights_only(),
    reason=f'torch {torch.__version__}: torch.load is not weights-only by default before 2.6, '
           f'so allow_mmengine_checkpoints has nothing to allow (a no-op)')


@pytest.fixture
def restored_safe_globals():
    """Run a test from torch's default allow-list and put the session's back afterwards."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


def _mmengine_like_checkpoint():
    """What mmengine's Runner saves: a message hub of HistoryBuffers, numpy scalars, a
    MultiStepLR state with a Counter, and tensors."""
    hub = MessageHub('runtime_test_hub')
    for step in range(3):
        hub.update_scalar('train/loss', 1.0 / (step + 1))
    hub.update_info('eta', np.float64(12.5))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[8, 11])
    return dict(meta=dict(epoch=1, iter=3, dataset_meta=dict(classes=('a', 'b'))),
                state_dict=model.state_dict(), message_hub=hub.state_dict(),
                optimizer=optimizer.state_dict(), param_schedulers=[scheduler.state_dict()])


@needs_weights_only_default
def test_allow_list_reads_mmengine_checkpoints(tmp_path, restored_safe_globals):
    path = tmp_path / 'epoch_1.pth'
    saved = _mmengine_like_checkpoint()
    torch.save(saved, path)
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer|numpy|Counter'):
        torch.load(path, weights_only=True)  # torch >= 2.6's default refuses it

    allow_mmengine_checkpoints()
    loaded = torch.load(path, weights_only=True)
    buffer = loaded['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    np.testing.assert_allclose(buffer.data[0], [1.0, 0.5, 1 / 3])
    assert buffer.mean() == pytest.approx((1 + 0.5 + 1 / 3) / 3)  # methods restored
    assert loaded['param_schedulers'][0]['milestones'] == {8: 1, 11: 1}
    assert loaded['optimizer']['state'][0]['step'] == saved['optimizer']['state'][0]['step']
    assert torch.equal(loaded['state_dict']['weight'], saved['state_dict']['weight'])


class _Smuggler:
    """Pickles as getattr(HistoryBuffer, '__init__'): not a statistics method."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, '__init__')


@needs_weights_only_default
def test_allow_list_does_not_allow_getattr(tmp_path, restored_safe_globals):
    path = tmp_path / 'evil.pth'
    torch.save({'x': _Smuggler()}, path)
    allow_mmengine_checkpoints()
    with pytest.raises(Exception, match='only HistoryBuffer statistics methods'):
        torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------
# One reader on every torch of the supported range (issue 15): torch's own pickle format,
# read through rest_mm's restricted unpickler, never through torch's version-dependent
# weights-only loader.
# ---------------------------------------------------------------------------------------
class _ShellPayload:
    """Pickles as ``os.system('touch MARKER')``: proof of execution is the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_checkpoint_that_runs_code_is_refused_unrun(tmp_path, zip_format):
    """A torch file (either format) whose pickle names os.system beside real tensors is
    refused, and the command never runs; plain unpickling (the control) runs it."""
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'meta': _ShellPayload(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointFileError, match=r'was refused: the pickle asks for '
                                                  r'(posix|nt|os)\.system'):
        read_checkpoint(str(path))
    with pytest.raises(CheckpointFileError, match='refused'):
        read_checkpoint(str(path), mmap=zip_format)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: unrestricted, the payload runs
    assert marker.exists()


def test_getattr_smuggling_is_refused_by_the_reader(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'x': _Smuggler()}, path)
    with pytest.raises(CheckpointFileError, match='only HistoryBuffer statistics methods'):
        read_checkpoint(str(path))


@pytest.mark.parametrize('zip_format,mmap', [(True, False), (True, True), (False, False)],
                         ids=['zip', 'zip-mmap', 'legacy'])
def test_reader_reads_mmengine_checkpoints_on_every_torch(tmp_path, zip_format, mmap):
    """mmengine's training state (HistoryBuffers with their statistics methods, numpy
    scalars, a Counter, optimizer tensors), read without torch's safe-globals registry."""
    path = tmp_path / 'epoch_1.pth'
    saved = _mmengine_like_checkpoint()
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
    loaded = read_checkpoint(str(path), mmap=mmap)
    buffer = loaded['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    assert buffer.mean() == pytest.approx((1 + 0.5 + 1 / 3) / 3)
    assert loaded['message_hub']['runtime_info']['eta'] == np.float64(12.5)
    assert loaded['param_schedulers'][0]['milestones'] == {8: 1, 11: 1}
    assert loaded['meta'] == saved['meta']
    assert torch.equal(loaded['state_dict']['weight'], saved['state_dict']['weight'])
    assert torch.equal(loaded['optimizer']['state'][0]['exp_avg'],
                       saved['optimizer']['state'][0]['exp_avg'])


def test_torchscript_archive_is_refused(tmp_path):
    """torch.load hands a TorchScript archive to torch.jit.load (code, not data)."""
    path = tmp_path / 'scripted.pt'
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointFileError, match='is a TorchScript archive'):
        read_checkpoint(str(path))


def test_tar_format_is_refused(tmp_path):
    """torch's pre-1.6 tar format (a tar of ``sys_info``, ``pickle``, ``storages``,
    ``tensors``) is refused before anything in it is read."""
    path = tmp_path / 'ancient.pth'
    with tarfile.open(path, 'w', format=tarfile.PAX_FORMAT) as archive:
        for name in ('sys_info', 'pickle', 'storages', 'tensors'):
            member = tmp_path / name
            member.write_bytes(pickle.dumps({'w': 1}, protocol=2))
            archive.add(member, arcname=name)
    with pytest.raises(CheckpointFileError, match="pre-1.6 tar format"):
        read_checkpoint(str(path))


@pytest.fixture
def served(tmp_path):
    """``(folder, base_url)``: an HTTP server on localhost serving ``folder``, with torch
    hub's cache moved under ``tmp_path``."""
    folder = tmp_path / 'site'
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / 'hub'))
    yield folder, f'http://127.0.0.1:{server.server_address[1]}'
    torch.hub.set_dir(hub_dir)
    server.shutdown()
    thread.join()


def test_urls_are_read_by_the_same_reader(tmp_path, served, reference_dir, reference_arch):
    """An http(s) checkpoint is downloaded into torch hub's cache and read like a local
    file: it loads, and one that would run code is refused unrun."""
    folder, base = served
    weights = _reference_v2(reference_dir)
    torch.save({'model': weights}, folder / 'good.pth')
    model = ResTV2(arch=reference_arch)
    load_pretrained(model, f'{base}/good.pth')
    torch.testing.assert_close(model.stem.norm.weight, weights['stem.norm.weight'])
    assert (tmp_path / 'hub' / 'checkpoints' / 'good.pth').is_file()

    marker = tmp_path / 'ran'
    torch.save({'state_dict': weights, 'x': _ShellPayload(marker)}, folder / 'evil.pth')
    with pytest.raises(CheckpointFileError, match=r'was refused: .*system'):
        read_checkpoint(f'{base}/evil.pth')
    assert not marker.exists()
    with pytest.raises(CheckpointFileError, match='could not be downloaded .*404'):
        read_checkpoint(f'{base}/missing.pth')
