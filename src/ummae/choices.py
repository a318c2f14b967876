"""The fixed sets of option values that several layers share: the command line shows them
(``--precision {auto,bf16,fp16,fp32}``) and checks them without importing torch, and the code
below it (data pipelines, detectors, segmentation inference) acts on them. Defined once here,
at the bottom of the layers, so that no lower layer imports the config to know them."""

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
INPUT_PIPELINES = ("tensor", "pil", "device")  # pre-training samples: data/transforms.build_pretrain_transform
DETECTORS = ("gfl", "maskrcnn", "retinanet", "fcos", "cascade_maskrcnn", "htc")
MASK_DETECTORS = ("maskrcnn", "cascade_maskrcnn", "htc")  # box and mask AP
BOX_HEADS = ("2fc", "4conv1fc")  # cascade / HTC box heads: Shared2FCBBoxHead, Shared4Conv1FCBBoxHead
BOX_NORMS = ("none", "bn", "gn")  # the 4conv1fc head's norm (bn: SyncBN under DDP on CUDA)
TRAIN_RESIZES = ("lsj", "range")  # detection training: large-scale jitter, MMDetection's "range" multi-scale
SEG_TEST_MODES = ("slide", "whole")
# Kinds of registered models (ummae.models.registry): whole models, and dense-task heads named
# <head>_<backbone>. Here, torch-free, so that `ummae models --kind` offers them at --help time.
MODEL_KINDS = ("pretrain", "classify")
HEAD_KINDS = ("detect", "segment")
