"""Tasks: what each command does with a model, on the one engine.

``base``: the :class:`~ummae.tasks.base.Task` shape and the one run set-up,
:func:`~ummae.tasks.base.run`; ``pretrain``; ``classify`` (finetune, linprobe, eval); ``knn``;
``detect`` and ``segment`` (train, eval, predict), with ``dense`` the validation they share."""
