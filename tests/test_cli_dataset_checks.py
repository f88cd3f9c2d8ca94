"""rest_mm/cli/dataset_checks.py: what a dataset holds, checked at start-up (issue 16) through
the check train and test make (``preflight.check_datasets``), and end to end through
``tools/train.py`` and ``tools/test.py``, which refuse the run before anything is built."""
import json
from pathlib import Path

import numpy as np
import pytest
from mmengine.config import Config
from PIL import Image

from rest_mm.cli import dataset_checks, preflight
from rest_mm.cli import test as test_tool
from rest_mm.cli import train as train_tool

from testlib import SMALL_SPEC, TOY_CONFIG_DIR, fresh_toy_data, needs_full_stack, toy_options

pytestmark = needs_full_stack

DET_CONFIG = TOY_CONFIG_DIR / 'retinanet_rest_small_toy.py'
SEG_CONFIG = TOY_CONFIG_DIR / 'upernet_restv2_tiny_toy.py'
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def _config(path: Path, data_root: Path) -> Config:
    cfg = Config.fromfile(str(path))
    for key in LOADERS:
        cfg[key].dataset.data_root = f'{data_root}/'
    return cfg


def _refusal(cfg: Config, loaders=LOADERS[:2]) -> str:
    """The one-line message ``check_datasets`` refuses ``cfg`` with."""
    with pytest.raises(ValueError) as error:
        preflight.check_datasets(cfg, list(loaders))
    message = str(error.value)
    assert '\n' not in message
    return message


def _edit_json(path: Path, edit) -> None:
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))


def _write_label(path: Path, label: np.ndarray) -> None:
    Image.fromarray(label.astype(np.uint8)).save(path)


@pytest.fixture
def data(tmp_path) -> Path:
    return fresh_toy_data(tmp_path)


def test_good_toy_data_passes_and_says_what_it_decoded(data, monkeypatch):
    logged = []
    monkeypatch.setattr(dataset_checks, 'print_log', lambda message, **_: logged.append(message))
    preflight.check_datasets(_config(DET_CONFIG, data / 'toy_coco'), LOADERS)
    preflight.check_datasets(_config(SEG_CONFIG, data / 'toy_ade'), LOADERS)
    assert len(logged) == 6, logged
    assert f'decoded all {SMALL_SPEC.num_train} images' in logged[0]
    assert "the config's 3 classes match its categories" in logged[0]
    assert 'sizes match, label values within the 4 classes' in logged[3]
    # A large set is sampled, and the log says so.
    monkeypatch.setattr(dataset_checks, 'DECODE_SAMPLE', 2)
    logged.clear()
    preflight.check_datasets(_config(DET_CONFIG, data / 'toy_coco'), ['train_dataloader'])
    preflight.check_datasets(_config(SEG_CONFIG, data / 'toy_ade'), ['train_dataloader'])
    sampled = f'decoded a sample of 2 of {SMALL_SPEC.num_train}'
    assert all(sampled in line for line in logged), logged


def test_missing_image_is_named(data):
    (data / 'toy_coco' / 'train' / 'toy_train_00001.jpg').unlink()
    message = _refusal(_config(DET_CONFIG, data / 'toy_coco'))
    assert message.startswith('train_dataloader: 1 of the 6 images')
    assert 'missing under' in message and 'toy_train_00001.jpg' in message


def test_truncated_image_is_named(data):
    image = data / 'toy_coco' / 'val' / 'toy_val_00002.jpg'
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])
    message = _refusal(_config(DET_CONFIG, data / 'toy_coco'))
    assert message.startswith('val_dataloader: 1 images of')
    assert f'cannot be decoded (decoded all {SMALL_SPEC.num_val} images)' in message
    assert f'{image} (image file is truncated' in message


def test_class_name_typo_names_missing_and_extra_categories(data):
    cfg = _config(DET_CONFIG, data / 'toy_coco')
    cfg.train_dataloader.dataset.metainfo.classes = ('rectangle', 'elipse', 'triangle')
    message = _refusal(cfg)
    assert ("the config's classes 'elipse' (did you mean 'ellipse'?) are no categories of "
            f"{data}/toy_coco/annotations/instances_train.json; its categories not in the "
            "config: 'ellipse'") in message
    # The same names in another order would give every label another class's name.
    cfg.train_dataloader.dataset.metainfo.classes = ('ellipse', 'rectangle', 'triangle')
    assert ("List metainfo.classes in the file's order: ('rectangle', 'ellipse', 'triangle')"
            in _refusal(cfg))


def test_annotations_of_other_category_ids_are_refused(data):
    ann_file = data / 'toy_coco' / 'annotations' / 'instances_train.json'
    count = len(json.loads(ann_file.read_text())['annotations'])

    def renumber_annotations(coco):
        for ann in coco['annotations']:
            ann['category_id'] += 10
    _edit_json(ann_file, renumber_annotations)
    message = _refusal(_config(DET_CONFIG, data / 'toy_coco'))
    assert f'{count} annotations of {ann_file} have category ids 1' in message
    assert 'that none of its categories has (its category ids: 1, 2, 3)' in message

    def renumber_categories(coco):  # ids are free, as long as they agree
        for category in coco['categories']:
            category['id'] += 10
    _edit_json(ann_file, renumber_categories)
    preflight.check_datasets(_config(DET_CONFIG, data / 'toy_coco'), ['train_dataloader'])


def test_empty_training_set_names_the_annotation_file(data):
    """mmengine's words were ``need at least one array to concatenate``."""
    ann_file = data / 'toy_coco' / 'annotations' / 'instances_train.json'
    _edit_json(ann_file, lambda coco: coco.update(annotations=[]))
    message = _refusal(_config(DET_CONFIG, data / 'toy_coco'))
    assert message == (f'train_dataloader: the training set {ann_file} keeps no image: it has '
                       f"no annotation of the config's classes, and filter_cfg.filter_empty_gt="
                       f'True leaves out images without one')
    val_file = data / 'toy_coco' / 'annotations' / 'instances_val.json'
    _edit_json(val_file, lambda coco: coco.update(images=[]))
    assert f'val_dataloader: {val_file} lists no images' in _refusal(
        _config(DET_CONFIG, data / 'toy_coco'))


def test_label_values_outside_the_classes_are_named(data):
    label = data / 'toy_ade' / 'annotations' / 'training' / 'toy_train_00003.png'
    values = np.zeros((SMALL_SPEC.height, SMALL_SPEC.width))
    values[:4, :4], values[-4:, -4:], values[10, 10] = 7, 255, 4
    _write_label(label, values)
    message = _refusal(_config(SEG_CONFIG, data / 'toy_ade'))
    assert f'{label} holds 4, 7' in message
    assert ('with 4 classes, ignore_index=255, reduce_zero_label=False the values accepted '
            'are 0-3, 255') in message
    # reduce_zero_label: 0 is ignored and v is class v - 1, so 4 is a class and 5 is none.
    cfg = _config(SEG_CONFIG, data / 'toy_ade')
    cfg.train_dataloader.dataset.reduce_zero_label = True
    values[:4, :4] = 5
    _write_label(label, values)
    message = _refusal(cfg, ['train_dataloader'])
    assert f'{label} holds 5' in message and 'the values accepted are 0-4, 255' in message
    # ADE20KDataset's own defaults (its __init__ passes most arguments on): 150 classes,
    # reduce_zero_label=True.
    dataset = cfg.train_dataloader.dataset
    dataset.type = 'ADE20KDataset'
    dataset.pop('metainfo'), dataset.pop('reduce_zero_label')
    values[:4, :4] = 200
    _write_label(label, values)
    message = _refusal(cfg, ['train_dataloader'])
    assert f'{label} holds 200' in message
    assert ('with 150 classes, ignore_index=255, reduce_zero_label=True the values accepted '
            'are 0-150, 255') in message


def test_label_map_of_another_size_and_a_missing_one_are_named(data):
    labels = data / 'toy_ade' / 'annotations' / 'validation'
    _write_label(labels / 'toy_val_00001.png', np.zeros((24, 32)))
    (labels / 'toy_val_00002.png').unlink()
    message = _refusal(_config(SEG_CONFIG, data / 'toy_ade'))
    assert (f'1 label maps differ in size (w x h) from their images (decoded all 2 pairs): '
            f'{labels}/toy_val_00001.png is 32x24 but its image is 64x48') in message
    assert (f'1 of the 3 images under {data}/toy_ade/images/validation have no label map in '
            f'{labels} (ending in .png): toy_val_00002.png') in message


def _refused_run(main, argv, capsys) -> str:
    """What ``main(argv)`` says as it refuses to run."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    return f'{exit_info.value.code} {capsys.readouterr().err}'


def test_train_refuses_a_broken_dataset_before_training(data, tmp_path, capsys):
    (data / 'toy_coco' / 'train' / 'toy_train_00004.jpg').unlink()
    work_dir = tmp_path / 'work'
    said = _refused_run(train_tool.main, [str(DET_CONFIG), '--work-dir', str(work_dir)]
                        + toy_options(data, 'mmdet'), capsys)
    assert 'missing under' in said and 'toy_train_00004.jpg' in said
    assert not work_dir.exists()  # nothing was built, nothing was written


def test_test_refuses_a_broken_dataset_before_testing(data, tmp_path, capsys):
    label = data / 'toy_ade' / 'annotations' / 'validation' / 'toy_val_00000.png'
    _write_label(label, np.full((SMALL_SPEC.height, SMALL_SPEC.width), 9))
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')  # refused before it is read
    work_dir = tmp_path / 'work'
    said = _refused_run(test_tool.main, [str(SEG_CONFIG), str(checkpoint), '--work-dir',
                                         str(work_dir)] + toy_options(data, 'mmseg'), capsys)
    assert f'{label} holds 9' in said
    assert not work_dir.exists()
