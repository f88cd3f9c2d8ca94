"""tools/main_job.py (``make demo``) on a shortened schedule."""
import json
import sys
from pathlib import Path

import pytest

from testlib import TOOLS_DIR, needs_full_stack, run

pytestmark = [pytest.mark.slow, needs_full_stack]

# The main job's test at half the toy images' size (a quarter of the pixels, a third of the
# full-size run's work): 345 s of CPU time, 7 min on this project's 2-core machine while four
# other jobs ran (load 5); bbox mAP@50 0.00 -> 0.24 there.
MAIN_JOB_SCALE = '(80,64)'
MAIN_JOB_EPOCHS = 4
MAIN_JOB_TIMEOUT = 1200


def test_main_job_learns(tmp_path):
    """`make demo`'s code path on a shortened schedule and smaller images: data, baseline,
    training, test with pictures, and a bbox mAP clearly above the untrained model's."""
    work_dir = tmp_path / 'main_job'
    scale = [f'{loader}.dataset.pipeline.{1 if loader != "train_dataloader" else 2}.scale='
             f'{MAIN_JOB_SCALE}' for loader in ('train_dataloader', 'val_dataloader',
                                                'test_dataloader')]
    result = run([sys.executable, TOOLS_DIR / 'main_job.py', '--work-dir', work_dir,
                  '--epochs', MAIN_JOB_EPOCHS, '--cfg-options', *scale],
                 timeout=MAIN_JOB_TIMEOUT)
    assert '1/4' in result.stdout and '4/4' in result.stdout and 'Epoch(train)' in result.stdout
    results = json.loads((work_dir / 'results.json').read_text())
    print(results)
    assert results['trained']['coco/bbox_mAP_50'] > results['untrained']['coco/bbox_mAP_50'] + 0.1
    assert len(list(Path(results['pictures']).glob('*.jpg'))) >= 3
