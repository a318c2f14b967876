"""Tasks: what a command does with a model (pre-training, classification, kNN, detection,
segmentation), each on the one engine."""
