# UperNet ResTv2-Small, tested as the authors tested it: each test image rescaled into
# (2048, 512) keeping its aspect ratio, then resized to the next multiples of 32
# (rest_mm.transforms.AlignResize), single-scale and with --tta. Training is unchanged.
_base_ = ['./upernet_restv2_small_ade20k.py']

custom_imports = dict(imports=['rest_mm', 'rest_mm.transforms'], allow_failed_imports=False)

val_dataloader = dict(dataset=dict(pipeline={{_base_.align32_test_pipeline}}))
test_dataloader = val_dataloader
tta_pipeline = {{_base_.align32_tta_pipeline}}
