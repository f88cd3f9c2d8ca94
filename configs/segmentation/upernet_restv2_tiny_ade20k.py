# UperNet with a ResTv2-Tiny backbone on ADE20K: 512x512 crops, 160k iterations, 16 images
# per batch (2 per GPU x 8 GPUs). The authors' recipe is Swin's UperNet recipe, which this
# inherits: AdamW (lr 6e-5, weight decay 0.01, none on normalization layers), a linear
# warm-up over 1500 iterations, then poly decay; here with drop path 0.1.
# Published size (auxiliary head included): 62.1 M parameters.
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']

custom_imports = dict(imports=['rest_mm'], allow_failed_imports=False)

# The authors' ImageNet-1k weights, as downloaded (the converter in rest_mm reads their
# layout) or after `python tools/convert_weights.py`. Put the file here, or point the
# path at it; init_cfg=None trains from scratch. (The name replaces the Swin base's.)
checkpoint_file = 'checkpoints/restv2_tiny.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='ResTV2',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
    # Test images keep their natural size (the short side resized to 512, e.g. 512x683)
    # and are segmented whole: the backbone takes any size, so the data preprocessor pads
    # only the training crops (to its `size`) and has no size_divisor and no test padding.
    test_cfg=dict(mode='whole'))

# No weight decay on normalization layers, found by type: Swin's rule (parameter names
# containing 'norm') would miss the BatchNorms of ResTv2's stem, and its keys for Swin's
# position tables have no counterpart here.
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True, norm_decay_mult=0.))
