"""Training-free open-vocabulary segmentation (SCLIP and peers) with a frozen CLIP ViT."""

from clipadapt.segmentation.configs import SEG_CONFIGS, SegConfig, segmenter_options
from clipadapt.segmentation.evaluation import class_iou, confusion_update, evaluate
from clipadapt.segmentation.queries import default_cache_dir, parse_classes, query_embeddings
from clipadapt.segmentation.segmenter import Segmenter
from clipadapt.segmentation.windows import resized_shape, window_boxes

__all__ = [
    "SEG_CONFIGS",
    "SegConfig",
    "Segmenter",
    "class_iou",
    "confusion_update",
    "default_cache_dir",
    "evaluate",
    "parse_classes",
    "query_embeddings",
    "resized_shape",
    "segmenter_options",
    "window_boxes",
]
