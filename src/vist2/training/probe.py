"""Is the visual path alive? The blind gap and the spread of the aligner's outputs, at eval time.

A model trained from scratch can learn to ignore its images: the LLM learns word
frequencies from the text, the vision features become the same for every image, the
aligner's tanh saturates (and then passes almost no gradient back), and the collapse is
permanent. The loss keeps falling, so the loss alone does not show it. Two measurements do:

- the **blind gap**: eval loss with blank pages (the renderer's background, no text) in
  place of the real images, minus the eval loss with the real images. ~0 means the model
  gets nothing from its images;
- the **spread** of the aligner's outputs across images: for every visual slot and
  dimension the standard deviation over the eval images, averaged; ~0 means every image
  becomes the same vector. Reported with the share of outputs past ``|tanh| > 0.99``.

The trainer runs a :class:`VisualProbe` inside its evaluation (stages with images), logs
``probe/*`` scalars and warns when :func:`diagnose` finds a collapse.

    >>> probe = VisualProbe(model, blank=1.0)                               # doctest: +SKIP
    >>> out = model(plan=plan, pixel_values=pixels)   # the hook records the aligner outputs  # doctest: +SKIP
    >>> probe.observe(model, plan, pixels, float(out.loss), n_targets)      # doctest: +SKIP
    >>> result = probe.finish()                                              # doctest: +SKIP
    >>> result.blind_gap, result.spread, diagnose(result, past_warmup=True)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

log = logging.getLogger(__name__)

PROBED_STAGES = ("caption", "ocr", "olm", "sft")  # the stages whose samples hold images
SATURATED = 0.99  # |tanh| above this passes < 2 % of the gradient back
MIN_REL_SPREAD = 0.02  # spread / RMS of the outputs below this: every image looks the same
MIN_BLIND_GAP = 0.01  # nats per target token; below this after warm-up, the images do not help


@dataclass
class ProbeResult:
    loss: float  # eval loss per target token, real images
    blind_loss: float  # the same with blank images
    blind_gap: float  # blind_loss - loss
    spread: float  # mean over visual slots and dimensions of the std across images
    rel_spread: float  # spread / RMS of the outputs (scale-free)
    saturated: float  # share of aligner outputs with |x| > SATURATED
    images: int
    collapsed: bool = False
    reasons: list[str] = field(default_factory=list)

    def scalars(self) -> dict[str, float]:
        return {"probe/blind_gap": self.blind_gap, "probe/blind_loss": self.blind_loss, "probe/spread": self.spread,
                "probe/rel_spread": self.rel_spread, "probe/saturated": self.saturated,
                "probe/collapsed": float(self.collapsed)}

    def as_dict(self) -> dict:
        return asdict(self)


def diagnose(result: ProbeResult, past_warmup: bool) -> list[str]:
    """Why the visual path looks collapsed (empty: it does not). The blind gap only counts after
    warm-up: an untrained model gets nothing from its images yet, and that is not a collapse."""
    reasons = []
    if result.images >= 2 and result.rel_spread < MIN_REL_SPREAD:
        reasons.append(f"the aligner gives (almost) the same output for every image: spread {result.spread:.2e} "
                       f"({result.rel_spread:.1%} of the output RMS), {result.saturated:.1%} saturated")
    if past_warmup and result.blind_gap < MIN_BLIND_GAP:
        reasons.append(f"blank pages give the same loss as the real images: blind gap {result.blind_gap:.4f} nats")
    return reasons


class VisualProbe:
    """Accumulates, over eval batches, the loss with real and with blank images and the aligner's outputs.

    The aligner's outputs are recorded by a forward hook while the caller runs its ordinary eval
    forward; :meth:`observe` then runs the same plan with blank pages. ``model`` may be wrapped
    (DDP): the hook goes on ``aligner`` (default ``model.model.aligner``). Call :meth:`finish` once.
    """

    def __init__(self, model, blank: float = 1.0, aligner: torch.nn.Module | None = None):
        aligner = aligner if aligner is not None else model.model.aligner
        cfg = model.config
        n_visual, dim = cfg.n_visual, cfg.text_config.hidden_size
        device = next(aligner.parameters()).device
        self.blank = blank
        # fixed shapes from the config, so every rank reduces the same tensors even without images
        self.sum_BD = torch.zeros(n_visual, dim, dtype=torch.float64, device=device)
        self.sq_BD = torch.zeros(n_visual, dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(5, dtype=torch.float64, device=device)  # images, saturated, real, blank, targets
        self._recording = True
        self._hook = aligner.register_forward_hook(self._record)

    def _record(self, module, inputs, out_NBD: torch.Tensor) -> None:
        if not self._recording or out_NBD.shape[1] != self.sum_BD.shape[0]:
            return
        x = out_NBD.detach().double()
        self.sum_BD += x.sum(0)
        self.sq_BD += (x * x).sum(0)
        self.counts[0] += x.shape[0]
        self.counts[1] += (x.abs() > SATURATED).sum()

    @torch.no_grad()
    def observe(self, model, plan, pixel_values: torch.Tensor, loss: float, n_targets: int) -> None:
        """After the real forward of ``plan`` (mean loss ``loss`` over ``n_targets``): the blank one."""
        self._recording = False
        try:
            blank = torch.full_like(pixel_values, self.blank)
            blind = model(plan=plan, loss_only=True, pixel_values=blank).loss
        finally:
            self._recording = True
        self.counts[2:] += torch.tensor([loss * n_targets, float(blind) * n_targets, n_targets],
                                        dtype=torch.float64, device=self.counts.device)

    def finish(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ProbeResult | None:
        """The result over everything observed (summed over ranks by ``reduce``); None without images."""
        self._hook.remove()
        flat = torch.cat([self.sum_BD.flatten(), self.sq_BD.flatten(), self.counts])
        if reduce is not None:
            flat = reduce(flat)
        n_el = self.sum_BD.numel()
        s, sq, c = flat[:n_el], flat[n_el : 2 * n_el], flat[2 * n_el :]
        n, n_sat, real, blind, targets = (float(v) for v in c)
        if n == 0 or targets == 0:
            return None
        mean, mean_sq = s / n, sq / n
        spread = float((mean_sq - mean * mean).clamp(min=0).sqrt().mean())
        rms = math.sqrt(float(mean_sq.mean()))
        loss, blind_loss = real / targets, blind / targets
        return ProbeResult(loss=loss, blind_loss=blind_loss, blind_gap=blind_loss - loss, spread=spread,
                           rel_spread=spread / max(rms, 1e-12), saturated=n_sat / (n * n_el), images=int(n))


def report(result: ProbeResult, step: int, past_warmup: bool, log_scalars: Callable[..., None],
           write: Callable[[str], None] | None = None, main: bool = True) -> dict:
    """Diagnose, log the ``probe/*`` scalars, warn on a collapse; returns the result as a dict."""
    result.reasons = diagnose(result, past_warmup)
    result.collapsed = bool(result.reasons)
    log_scalars(result.scalars(), step=step)
    line = (f"step {step}: blind gap {result.blind_gap:.4f} nats, aligner spread {result.spread:.3g} "
            f"({result.rel_spread:.1%} of RMS), {result.saturated:.1%} saturated")
    if main:
        if result.collapsed:
            msg = f"{line}: THE VISUAL PATH HAS COLLAPSED: " + "; ".join(result.reasons)
            if write is not None:  # once: the user's line (above the bar), or the log when there is none
                write("WARNING " + msg)
            else:
                log.warning("%s", msg)
        elif write is not None:
            write(line)
    return dict(result.as_dict(), step=step)
