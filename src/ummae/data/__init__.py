"""Image data. Modules, bottom to top (each imports only modules listed before it):

- :mod:`~ummae.data.sources`: where the images are (folders, list files, the demo photos);
- :mod:`~ummae.data.collate`: batches, counting unreadable images;
- :mod:`~ummae.data.device_decode`: the ``device`` input pipeline (JPEGs decoded by the step);
- :mod:`~ummae.data.decode`: image files -> RGB images;
- :mod:`~ummae.data.transforms`: augmentations and their seeded application;
- :mod:`~ummae.data.dataset`: :class:`ImageDataset`, which every task reads through;
- :mod:`~ummae.data.shards`: reading tar shards (:mod:`~ummae.data.shard_writer` writes them);
- :mod:`~ummae.data.sampler`: the resumable sampler and the training loader;
- :mod:`~ummae.data.pretrain`, :mod:`~ummae.data.classify`, :mod:`~ummae.data.coco`,
  :mod:`~ummae.data.ade`: the datasets of pre-training, classification, COCO detection and
  ADE20K-style segmentation."""

from ummae.data.classify import build_classify_dataset, build_classify_transform, build_eval_loader
from ummae.data.collate import collate_skip_bad
from ummae.data.dataset import ImageDataset, NoReadableImageError, SubstituteUnreadable
from ummae.data.pretrain import build_pretrain_dataset
from ummae.data.sampler import ResumableSampler, build_train_loader

__all__ = [
    "ImageDataset",
    "NoReadableImageError",
    "ResumableSampler",
    "SubstituteUnreadable",
    "build_classify_dataset",
    "build_classify_transform",
    "build_eval_loader",
    "build_pretrain_dataset",
    "build_train_loader",
    "collate_skip_bad",
]
