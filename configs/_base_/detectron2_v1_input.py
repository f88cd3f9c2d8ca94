# detectron2's input as the authors' v1 detectors were trained and evaluated with it, shared
# by retinanet_rest_small_coco.py and mask_rcnn_rest_small_coco.py (and what inherits them).
#
# mmengine refuses a key that two bases of one config both set ("Duplicate key is not
# allowed among bases"), and every key this block belongs to is already set by a sibling
# base: `model` (the data preprocessor) by mmdet's model base, `train_pipeline` and
# `test_pipeline` (and `backend_args`) by mmdet's dataset base. So this file sets one key
# of its own, `detectron2_v1_input`, holding the pieces; a config takes them with
# `_base_.pop('detectron2_v1_input')`, which also keeps the helper key out of the resolved
# config (tests/test_configs.py checks both).
# The v2 configs have no such base: they share only their RGB preprocessor (two lines);
# their pipelines differ (crop, scales).
detectron2_v1_input = dict(
    # detectron2's default input: BGR images, its BGR pixel mean and a std of 1 (a later
    # yaml of the authors calls this a mistake, but their published numbers and released
    # models come from it).
    data_preprocessor=dict(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0],
                           bgr_to_rgb=False),
    # detectron2 decodes and resizes images with PIL (bilinear, antialiased when
    # shrinking). The loader's backend_args come from the config's dataset base.
    load_image=dict(type='LoadImageFromFile', imdecode_backend='pillow'),
    # Training: the short side one of 640, 672, ..., 800, the long side at most 1333.
    train_resize=dict(type='RandomChoiceResize',
                      scales=[(1333, short) for short in (640, 672, 704, 736, 768, 800)],
                      keep_ratio=True, backend='pillow'),
    # Testing: the short side 800, the long side at most 1333.
    test_resize=dict(type='Resize', scale=(1333, 800), keep_ratio=True, backend='pillow'),
    test_pack=dict(type='PackDetInputs',
                   meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
)
