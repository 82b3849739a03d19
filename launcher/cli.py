"""`python -m launcher <stage> [--config FILE] [--set key=value ...]` and `pipeline`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from launcher.config import ConfigError, dump, load_config
from launcher.stages import STAGES, run, run_pipeline

EPILOG = """\
examples:
  python -m launcher pipeline --config configs/demo.yaml
  python -m launcher prepare --set data.format=ninerec --set data.source=../shared/data/ninerec/Bili_Food \\
      --set run_dir=runs/food
  torchrun --nproc_per_node 2 -m launcher train-id --config configs/demo.yaml

Every stage reads and writes <run_dir>/<stage>/ and a manifest.json; a stage whose manifest
matches its config and inputs is skipped (--force redoes it).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher", description="sicsrec: multimodal sequential "
                                     "recommendation training (SICSRec, TSSR).", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config file (see configs/); defaults apply when omitted")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.kcore=3 (repeatable; values are YAML)")
    common.add_argument("--run-dir", help="shorthand for --set run_dir=DIR")
    common.add_argument("--force", action="store_true", help="redo stages even when their manifest says done")
    sub.add_parser("pipeline", parents=[common], help="run the stages listed in the config's `pipeline`")
    for name, stage in STAGES.items():
        sub.add_parser(name, parents=[common], help=stage.help)
    sub.add_parser("show-config", parents=[common], help="print the resolved config tree as JSON")
    add_sweep_parser(sub, common)
    return parser


SWEEP_EPILOG = """\
Each batch size runs in <run_dir>/sweep/<stage>/b<batch>-<rule>/ (upstream stages of <run_dir>
linked in); finished ones are skipped. The table (batch, world size, lr, samples/s, peak memory,
epochs, test NDCG@10 / Hit@10 (SFT: held-out pair and t2i recall@10), alignment, uniformity)
goes to <run_dir>/sweep/<stage>/sweep.{json,md} with sweep_quality.png, sweep_throughput.png and
sweep_align_uniform.png. Under torchrun the world size comes from the environment.
examples:
  python -m launcher sweep-batch --config configs/demo.yaml --stage train-id --batch-sizes 64,128,256 \\
      --lr-scaling sqrt
  torchrun --nproc_per_node 2 -m launcher sweep-batch --stage train-sicsrec --batch-sizes 128,256 --index 1
  python -m launcher sweep-batch --stage train-sicsrec --batch-sizes 128,256 --collect
"""


def add_sweep_parser(sub, common: argparse.ArgumentParser) -> None:
    from launcher.sweep import RULES, SWEEP_STAGES

    sweep = sub.add_parser("sweep-batch", parents=[common], epilog=SWEEP_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           help="run a trainer over global batch sizes (lr scaled); table + plots",
                           description="Batch-size sweep: run a stage once per global batch size with the "
                                       "learning rate scaled from the config's.")
    sweep.add_argument("--stage", required=True, choices=list(SWEEP_STAGES), help="the trainer to sweep")
    sweep.add_argument("--batch-sizes", required=True, metavar="B1,B2,...", help="global batch sizes, e.g. 64,128,256")
    sweep.add_argument("--lr-scaling", choices=RULES, default="none",
                       help="lr = config lr x (1 | b/base | sqrt(b/base)) (default none)")
    sweep.add_argument("--base-batch", type=int, metavar="B",
                       help="the batch size the config's lr is meant for (default: the config's batch size)")
    sweep.add_argument("--index", type=int, metavar="I", help="run only the I-th batch size (0-based; SLURM arrays)")
    sweep.add_argument("--collect", action="store_true", help="only aggregate finished runs into the table and plots")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        overrides = args.set + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
        cfg = load_config(args.config, overrides)
        if args.command == "show-config":
            print(dump(cfg))
        elif args.command == "sweep-batch":
            from launcher.sweep import parse_batch_sizes, sweep_batch

            sweep_batch(cfg, args.stage, parse_batch_sizes(args.batch_sizes), args.lr_scaling, args.base_batch,
                        args.index, args.collect, args.force)
        elif args.command == "pipeline":
            run_pipeline(cfg, args.force)
        else:
            run(cfg, args.command, args.force)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
