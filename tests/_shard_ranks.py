"""Run under torchrun (gloo): every rank reads one epoch of tar shards through the training
loader, and rank 0 writes the sample labels each rank saw to the JSON file given.

    python -m torch.distributed.run --nproc_per_node 2 tests/_shard_ranks.py SHARDS OUT.json WORKERS BATCH
"""

import json
import sys

from ummae.data import build_pretrain_dataset, build_train_loader
from ummae.engine import dist as udist


def main(spec: str, out: str, workers: int, batch: int) -> None:
    with udist.distributed("cpu") as (info, _):
        ds = build_pretrain_dataset(spec, img_size=16)
        loader, sampler = build_train_loader(ds, batch, workers, info.world_size, info.rank, seed=3)
        sampler.set_epoch(0)
        seen = [int(v) for _, labels, _ in loader for v in labels]
        everything = udist.all_gather_object({"rank": info.rank, "labels": seen, "batches": sampler.num_batches()})
        if info.is_main:
            with open(out, "w") as f:
                json.dump(everything, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
