"""`python -m launcher <stage> [--config FILE] [--set key=value ...]` and `pipeline`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from launcher.config import ConfigError, dump, load_config
from launcher.stages import STAGES, run_pipeline

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
    for name, (_, help_text) in STAGES.items():
        sub.add_parser(name, parents=[common], help=help_text)
    sub.add_parser("show-config", parents=[common], help="print the resolved config tree as JSON")
    return parser


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
        elif args.command == "pipeline":
            run_pipeline(cfg, args.force)
        else:
            STAGES[args.command][0](cfg, args.force)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
