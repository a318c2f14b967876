"""Classification figures: top-1 / top-5 accuracy with the mean cross-entropy, and the weighted
k-nearest-neighbour vote on frozen features (the quick probe of pre-training quality used by
DINO and many MIM papers: cosine similarity, the ``k`` nearest training images vote for their
class with weight ``exp(sim / T)``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ummae.engine import dist as udist
from ummae.errors import UsageError
from ummae.evaluation.base import DatasetEvaluator


def model_outputs(model: nn.Module, batch, device: torch.device) -> Tensor:
    """The model's outputs (logits, or features of a head-less encoder) of a batch
    ``(images, labels, n_skipped)``, as fp32."""
    return model(batch[0].to(device, non_blocking=True)).float()


class TopKAccuracy(DatasetEvaluator):
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of logits against the labels
    (top-K for fewer than 5 classes): counts summed in float64 over the ranks."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        self.sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # images, top-1, top-5, loss

    def process(self, inputs, outputs: Tensor) -> None:
        labels = inputs[1].to(self.device, non_blocking=True)
        k = min(5, outputs.shape[1])
        hits = outputs.topk(k, dim=1).indices.eq(labels.unsqueeze(1))
        self.sums += torch.stack(
            [
                torch.tensor(float(labels.numel()), device=self.device, dtype=torch.float64),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                F.cross_entropy(outputs, labels, reduction="sum").double(),
            ]
        )

    def evaluate(self) -> dict[str, Any]:
        n, top1, top5, loss = udist.all_reduce_sum(self.sums.clone()).tolist()
        if n == 0:
            raise UsageError("the validation data yielded no readable image")
        return {"acc1": 100.0 * top1 / n, "acc5": 100.0 * top5 / n, "val_loss": loss / n, "val_images": int(n)}


def knn_scores(
    train_feats: Tensor,
    train_labels: Tensor,
    feats: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Class scores ``[M, num_classes]`` of ``feats [M, D]`` from ``train_feats [N, D]``."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for q in F.normalize(feats.float(), dim=1).split(chunk):
        sim, idx = (q @ train.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        out.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(out)


class FeatureBank(DatasetEvaluator):
    """The features (``dim`` wide) and labels of every image, in rank order
    (:attr:`features`, :attr:`labels` after :meth:`evaluate`, on every rank)."""

    def __init__(self, dim: int, device: torch.device):
        self.dim, self.device = dim, device

    def reset(self) -> None:
        self._feats: list[Tensor] = []
        self._labels: list[Tensor] = []

    def process(self, inputs, outputs: Tensor) -> None:
        self._feats.append(outputs)
        self._labels.append(inputs[1].to(self.device))

    def evaluate(self) -> dict[str, Any]:
        f = torch.cat(self._feats) if self._feats else torch.zeros(0, self.dim, device=self.device)
        y = torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long, device=self.device)
        self.features, self.labels = udist.all_gather_rows(f), udist.all_gather_rows(y)
        return {"images": int(self.labels.numel())}


class KnnEvaluator(FeatureBank):
    """Weighted kNN top-1 (%) of the images' features against the training images' ``bank``
    (:func:`knn_scores`)."""

    def __init__(self, bank: FeatureBank, num_classes: int, k: int, temperature: float):
        super().__init__(bank.dim, bank.device)
        self.bank, self.num_classes, self.k, self.temperature = bank, num_classes, k, temperature

    def evaluate(self) -> dict[str, Any]:
        n = super().evaluate()["images"]
        if not udist.is_main_process():  # every rank holds every feature: the vote once, on rank 0
            return {}
        scores = knn_scores(
            self.bank.features, self.bank.labels, self.features, self.num_classes, self.k, self.temperature
        )
        return {"knn_acc1": 100.0 * float((scores.argmax(1) == self.labels).float().mean()), "val_images": n}
