"""A torchrun worker for tests/test_zero3_items.py: builds the step-1 Trainer under DeepSpeed
ZeRO-3, trains one epoch, evaluates, and writes what this rank holds of the item table
(`item_emb.weight`) to <out_dir>/probe_rank<R>.json.

    torchrun --nproc_per_node 2 tests/zero3_probe.py PREPARED_DIR OUT_DIR CONFIG_JSON

CONFIG_JSON is a TrainConfig (engine=deepspeed, zero_stage=3). Recorded per rank: DeepSpeed's
partition attributes of every parameter (full `ds_numel`, local `ds_tensor` numel, the `data`
numel, `ds_status`, `ds_persist`) as built, after the epoch's steps and after evaluation; the
table's shape the loss saw in each forward; whether the ranks' partitions, concatenated, are the
whole (gathered) table; the local size of the fp32 optimizer partition; validation metrics.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shards.prepared import PreparedDataset  # noqa: E402
from sicsrec.config import TrainConfig  # noqa: E402
from sicsrec.runtime import dist as distenv  # noqa: E402
from sicsrec.train import Trainer  # noqa: E402


def partition(param: torch.nn.Parameter) -> dict:
    return {"ds_numel": int(param.ds_numel), "shape": list(param.ds_shape),
            "partition_numel": int(param.ds_tensor.numel()), "data_numel": int(param.data.numel()),
            "status": param.ds_status.name, "persist": bool(param.ds_persist)}


def main(prepared: Path, out: Path, cfg: TrainConfig) -> None:
    env = distenv.init(distenv.detect())
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, PreparedDataset.load(prepared), out, 0, env, "zero3-probe")
    engine, table = trainer.engine, trainer.model.item_emb.weight
    report = {"rank": env.rank, "world_size": env.world_size, "zero_stage": engine.zero_stage,
              "built": partition(table)}

    loss_module, seen = engine.module, []
    criterion = loss_module.criterion

    def recording(hidden, item_table, targets, offsets=None):  # the table as the loss sees it, inside the forward
        seen.append(list(item_table.shape))
        return criterion(hidden, item_table, targets, offsets)

    loss_module.criterion = recording
    train = trainer.train_epoch(0, None)
    loss_module.criterion = criterion
    report.update(steps=trainer.state["step"], loss=train["loss"], forward_table_shapes=seen,
                  after_steps=partition(table),
                  parameters={name: partition(p) for name, p in loss_module.named_parameters()})

    # the ranks' partitions, in rank order, are the flattened table (then padding)
    local = table.ds_tensor.detach().flatten().clone()
    parts = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(parts, local)
    whole = engine.module_state_dict()["recommender.item_emb.weight"]
    joined = torch.cat(parts)
    report["partitions_are_the_table"] = bool(torch.equal(joined[:whole.numel()].view_as(whole), whole))
    report["padding"] = int(joined.numel() - whole.numel())
    report["after_gather"] = partition(table)
    report["optimizer_partition_numel"] = int(sum(t.numel() for t in engine.ds.optimizer.fp32_partitioned_groups_flat))

    report["valid"] = trainer.evaluate("valid")
    report["after_eval"] = partition(table)
    (out / f"probe_rank{env.rank}.json").write_text(json.dumps(report, indent=1))
    distenv.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), TrainConfig(**json.loads(sys.argv[3])))
