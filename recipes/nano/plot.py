"""Curves of nano training runs (loss, blind gap, aligner spread) from their TensorBoard logs.

    python recipes/nano/plot.py --out bench/notes/nano_ocr.png runs/nano/ocr runs/nano/ocr-ctrl
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

PANELS = [("train/loss", "train loss"), ("eval/loss", "eval loss"), ("probe/blind_gap", "blind gap (nats)"),
          ("probe/rel_spread", "aligner spread / RMS"), ("probe/saturated", "saturated share"),
          ("train/page_loss", "page loss (MSE / var)"), ("train/char_loss", "character loss (CE)"),
          ("train/char_acc", "character accuracy (inked cells)")]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(run.glob("train/**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    fig, axes = plt.subplots(2, 4, figsize=(17, 6.5))
    for i, run in enumerate(args.runs):
        data = scalars(run)
        color = f"C{i}"  # one colour per run in every panel
        for ax, (tag, label) in zip(axes.flat, PANELS):
            pts = sorted(data.get(tag, []))
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="." if len(pts) < 30 else None,
                        label=run.name, color=color)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("step", fontsize=8)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
