"""Quality evaluation (the paper's Tables 2 and 3) on your own checkpoints and data.

    vist2 eval ocr --model runs/tiny --data passage.txt --ratios 1,2,4,8,10,16 --samples 100 --out runs/eval/ocr.json
    vist2 eval olm --model runs/tiny --data docs.jsonl --context-tokens 256 --out runs/eval/olm.json
    vist2 eval longbench --model runs/sft --data LongBench/data --max-kv 8192 --out runs/eval/longbench.json
    vist2 eval loogle --model runs/sft --data LooGLE/data --max-kv 8192 --out runs/eval/loogle.json
    vist2 eval general --runs gcc=runs/eval/general/gcc,none=runs/eval/general/none --out runs/eval/general.json
    vist2 eval niah --model runs/tiny --lengths 512,1024,2048 --depths 0,50,100 --out runs/eval/niah.json
    lm_eval --model vist2 --model_args pretrained=runs/tiny,mode=gcc --tasks my_task --include_path tasks/

``ocr``: transcription quality by compression ratio (:mod:`vist2.eval.ocr`); ``olm``: teacher-forced
perplexity with the context as visual memory vs. as plain text, and with ``--judge DIR`` the paper's
judged generation against the plain backbone (:mod:`vist2.eval.olm`); ``longbench`` and ``loogle``: the
paper's Tables 4 and 5, generation in each compression mode (:mod:`vist2.eval.longbench`,
:mod:`vist2.eval.loogle`); ``general``: Table 6 from lm-eval runs (:mod:`vist2.eval.general`); ``niah``:
RULER's needle in a haystack by context length and depth (:mod:`vist2.eval.niah`); the lm-eval-harness
model type ``vist2`` lives in :mod:`vist2.eval.lm_eval_adapter` (``pip install -e ".[eval]"``).
"""

from __future__ import annotations


def add_parser(sub) -> None:
    """Add ``eval`` with its sub-commands to an argparse sub-parsers object."""
    from . import general, longbench, loogle, niah, ocr, olm

    e = sub.add_parser("eval", help="quality evaluation: OCR by compression ratio, optical-LM perplexity "
                                    "(teacher-forced; judged generation with --judge), LongBench, LooGLE, Table 6, "
                                    "needle retrieval",
                       description="Evaluate a VIST2 checkpoint; each sub-command writes a results JSON "
                                   "(with the model folder, config hash, data sha256 and command) and prints a table.")
    esub = e.add_subparsers(dest="eval_command", metavar="EVALUATION")
    ocr.add_parser(esub)
    olm.add_parser(esub)
    longbench.add_parser(esub)
    loogle.add_parser(esub)
    general.add_parser(esub)
    niah.add_parser(esub)
    e.set_defaults(func=lambda args: _no_evaluation(e))


def _no_evaluation(parser) -> int:
    parser.print_help()
    return 2
