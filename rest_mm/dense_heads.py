"""RetinaNet's head with detectron2's order of post-processing (needs mmdet).

Configs use it after ``custom_imports=dict(imports=['rest_mm', 'rest_mm.dense_heads'])``,
which registers it in mmdet's ``MODELS``.
"""
from mmdet.models.dense_heads import RetinaHead
from mmdet.registry import MODELS


@MODELS.register_module()
class LateClippingRetinaHead(RetinaHead):
    """A ``RetinaHead`` that clips boxes to the image after NMS, as detectron2 does.

    mmdet's dense heads clip decoded boxes to the image before NMS (the bbox coder's
    ``clip_border``); detectron2's RetinaNet runs NMS on the unclipped boxes, then clips the
    survivors to the image and drops those left empty (``detector_postprocess``). Near the
    image border the two keep different boxes; this head keeps detectron2's, which the
    authors' published numbers and released detectors were evaluated with. Its bbox coder
    must not clip (``clip_border=False``). Training is RetinaHead's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.bbox_coder, 'clip_border', False):
            raise ValueError(f'{type(self).__name__} clips after NMS; give its bbox_coder '
                             f'clip_border=False (got True)')

    def _bbox_post_process(self, results, cfg, rescale=False, with_nms=True, img_meta=None):
        results = super()._bbox_post_process(results, cfg, rescale, with_nms, img_meta)
        height, width = img_meta['ori_shape'] if rescale else img_meta['img_shape']
        boxes = results.bboxes
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height)
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return results if nonempty.all() else results[nonempty]
