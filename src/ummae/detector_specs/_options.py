"""The options of the cascade detectors (cascade_maskrcnn, htc), each stated once; the spec
files list which of them they take."""

from ummae.detector_specs._spec import DetectorOption

BOX_HEAD = DetectorOption(
    "box_head",
    "2fc",
    "box heads: 2fc (MMDetection's Shared2FCBBoxHead) or 4conv1fc (Swin's, with --box-norm)",
    choices=("2fc", "4conv1fc"),
)
BOX_NORM = DetectorOption(
    "box_norm",
    "none",
    "norm of the 4conv1fc box heads' convs: bn (SyncBN under DDP on CUDA, Swin's) or gn",
    choices=("none", "bn", "gn"),
)
SOFT_NMS = DetectorOption("soft_nms", False, "Gaussian soft-NMS at test (HTC++), not NMS at 0.5")
GLOBAL_ATTN = DetectorOption(
    "global_attn",
    False,
    "HTC++'s extra global self-attention block on the backbone's last stage map, before its projection (Swin "
    "paper A2.2)",
    part="backbone",
)
SEMANTIC = DetectorOption(
    "semantic",
    False,
    "folder of COCO-stuff maps of the training images (stuffthingmaps, <image stem>.png, 255 ignored); builds "
    "HTC's semantic branch. Omitted: no semantic branch",
    set_by="stuff_maps",
)
CASCADE = (BOX_HEAD, BOX_NORM, SOFT_NMS, GLOBAL_ATTN)
