"""Weights: checkpoint files (:mod:`.io`: read with ``weights_only``, written atomically), the
reference importer (:mod:`.convert`), the two doors from a file to a model, and exports.

* :func:`.build.build_from_checkpoint` (``path, kind``): the model a checkpoint holds, rebuilt
  through the registry with its recorded options and loaded strictly: every eval, predict,
  visualize and convert;
* :func:`.load.load_pretrained` (``model, path``): pre-trained weights carried into a new
  classifier or dense backbone, adapted, with a :class:`.load.LoadReport` of every key;
* :mod:`.export`: ``ummae export`` and ``ummae convert``.

Layers inside: io < convert < load < build < export."""
