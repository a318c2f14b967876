"""The fixed sets of option values that several layers share: the command line shows them
(``--precision {auto,bf16,fp16,fp32}``) and checks them without importing torch, and the code
below it (data pipelines, segmentation inference) acts on them. Defined once here,
at the bottom of the layers, so that no lower layer imports the config to know them."""

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
INPUT_PIPELINES = ("tensor", "pil", "device")  # pre-training samples: data/transforms.build_pretrain_transform
TRAIN_RESIZES = ("lsj", "range")  # detection training: large-scale jitter, MMDetection's "range" multi-scale
SEG_TEST_MODES = ("slide", "whole")
# detection's lr schedules (ummae.engine.schedule): the paper's GFL cosine, MMDetection's step
DETECT_SCHEDULES = ("cosine", "step")
# Kinds of registered models (ummae.models.registry): whole models, and dense-task heads named
# <head>_<backbone>. Here, torch-free, so that `ummae models --kind` offers them at --help time.
MODEL_KINDS = ("pretrain", "classify")
HEAD_KINDS = ("detect", "segment")
