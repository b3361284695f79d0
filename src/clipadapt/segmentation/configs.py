"""Published SCLIP inference settings per benchmark, for 224-px ViTs (sources: docs/fidelity.md).

Window 224, stride 112, short side 336 (Cityscapes 560, COCO-Stuff-164k 448; COCO-Stuff-10k
336), long side at most 2048; logit scale 40 (Context60 and COCO-Object 50, VOC21 65); VOC21,
Context60 and COCO-Object turn pixels whose best class probability is under 0.1 into class 0
(SCLIP configs/cfg_<name>.py ``prob_thd``); VOC21 also drops classes
covering less than 10% of the predicted foreground. For a model with another input size the
window, stride and short side scale with it (window = the model's input size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from clipadapt.errors import ClipAdaptError

REFERENCE_SIZE = 224


@dataclass(frozen=True)
class SegConfig:
    short_side: int = 336
    long_side: int = 2048
    scale: float = 40.0
    bg_threshold: float | None = None
    area_threshold: float | None = None


SEG_CONFIGS: dict[str, SegConfig] = {
    "voc21": SegConfig(scale=65.0, bg_threshold=0.1, area_threshold=0.1),
    "voc20": SegConfig(),
    "context60": SegConfig(scale=50.0, bg_threshold=0.1),
    "context59": SegConfig(),
    "coco_object": SegConfig(scale=50.0, bg_threshold=0.1),
    "coco_stuff": SegConfig(short_side=448),  # COCO-Stuff-164k
    "coco_stuff10k": SegConfig(short_side=336),
    "cityscapes": SegConfig(short_side=560),
    "ade20k": SegConfig(),
}


def segmenter_options(dataset: str, image_size: int) -> dict:
    """Segmenter keyword arguments for ``dataset`` and a model of input side ``image_size``."""
    if dataset not in SEG_CONFIGS:
        raise ClipAdaptError(f"dataset {dataset!r}: expected one of {', '.join(SEG_CONFIGS)}")
    options = asdict(SEG_CONFIGS[dataset])
    options["short_side"] = round(options["short_side"] * image_size / REFERENCE_SIZE)
    options["window"] = image_size
    options["stride"] = image_size // 2
    return options
