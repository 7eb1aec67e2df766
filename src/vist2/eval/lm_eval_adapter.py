"""A ``vist2`` model type for lm-evaluation-harness (``pip install -e ".[eval]"``).

lm-eval finds model types in its registry, which this module fills when it is imported, so run
the harness through it (all arguments are lm-eval's own):

    python -m vist2.eval.lm_eval_adapter run --model vist2 \\
        --model_args pretrained=runs/tiny,mode=gcc --tasks my_task --include_path my_tasks/ --output_path runs/lm-eval

or from Python::

    import lm_eval, vist2.eval.lm_eval_adapter  # noqa: F401  (registers "vist2")
    lm_eval.simple_evaluate(model="vist2", model_args="pretrained=runs/tiny,mode=pcc", tasks=["my_task"],
                            task_manager=lm_eval.tasks.TaskManager(include_path="my_tasks/"))

Model arguments: ``pretrained`` (a VIST2 checkpoint folder), ``mode`` (``gcc``: prompt and output
compressed, the paper; ``pcc``: prompt only; ``none``: the plain LLM), ``dtype``, ``device``,
``batch_size``, ``max_gen_toks``, ``max_length`` (the KV budget: cache entries a request may hold,
default the LLM's ``max_position_embeddings``).

How requests become layouts (all through :mod:`vist2.layout`, as the engine does):

- ``loglikelihood(context, continuation)``: the context is a prompt compressed by the tail rule,
  :func:`~vist2.layout.prompt_segments` (raw for ``none``); the continuation follows with loss —
  as OLM chunks in ``gcc`` (:func:`~vist2.layout.sft_segments`: a continuation longer than a chunk
  is compressed as generated text would be), raw text in ``pcc`` and ``none``. Chunks are cut by
  the processor's fit rule (K tokens, or fewer when the next token would not fit the image), the
  one training and the engine use;
- ``loglikelihood_rolling(text)``: an end-of-text token, then the text as the continuation;
- ``generate_until``: :class:`vist2.engine.Engine` with the same mode, greedy unless the task asks
  for sampling, stopping at the task's ``until`` strings. A prompt whose footprint plus the generation
  is over ``max_length`` KV entries is cut in the middle (LongBench's rule, not lm-eval's left cut;
  :func:`vist2.eval.downstream.fit_to_budget`): compressed, a context of about r x ``max_length`` tokens
  fits before anything is cut.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ..engine import Engine, Request, SamplingParams
from ..modes import MODES
from ..layout import IGNORE, Raw, Segment, build_sample, collate, prompt_segments, sft_segments
from ..runtime import eos_ids, load_checkpoint
from .downstream import fit_to_budget

log = logging.getLogger(__name__)

@register_model("vist2")
class VIST2LM(LM):
    def __init__(self, pretrained: str, mode: str = "gcc", dtype: str = "float32", device: str | None = None,
                 batch_size: int | str | None = 1, max_gen_toks: int = 256, max_batch_size: int | None = None,
                 max_length: int | str | None = None, **kwargs):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda by default; a CPU-only machine still runs
            log.warning("device %s requested but CUDA is not available; using cpu", device)
            device = "cpu"
        self.model, self.processor = load_checkpoint(pretrained, device, dtype)
        self._device = self.model.device
        cfg = self.model.config
        self.K, self.n_visual, self.prompt_encoding = cfg.chunk_tokens, cfg.n_visual, cfg.prompt_encoding
        # "auto" (lm-eval's adaptive batch size) is not supported: fall back to a fixed size
        self.batch_size = int(batch_size) if str(batch_size or "").isdigit() else 1
        self.max_gen_toks = int(max_gen_toks)
        # the one token a context-free request is conditioned on (lm-eval's "prefix token"): an EOS
        self.prefix_token_id = eos_ids(cfg.text_config, self.processor.tokenizer)[0]
        # the KV budget: what a plain LLM's max_length is to lm-eval, in cache entries
        self._max_length = int(max_length) if max_length else cfg.text_config.max_position_embeddings
        if self._max_length <= 0:
            raise ValueError(f"max_length must be > 0, got {max_length!r}")
        self.engine = Engine(self.model, self.processor, max_batch=max(1, self.batch_size),
                             max_cache_tokens=self._max_length)

    # -- lm-eval plumbing ---------------------------------------------------------------

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "VIST2LM":
        """``--model_args pretrained=...,device=cpu``: lm-eval passes its own ``device`` and
        ``batch_size`` beside the model's arguments, and the base class hands both to the constructor
        (a TypeError when a name is in both). What ``--model_args`` says wins."""
        from lm_eval import utils

        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "VIST2LM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.processor.tokenizer, "name_or_path", "vist2")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.processor.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.processor.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    # -- layouts -----------------------------------------------------------------------

    def _segments(self, ctx: list[int], cont: list[int]) -> list[Segment]:
        """The layout the engine would have: the context as its prompt, the continuation (loss) as
        what it generates; chunks cut by the processor's fit rule."""
        if self.mode == "none":
            return [Raw(tuple(ctx)), Raw(tuple(cont), loss=True)]
        chunker = self.processor.chunker(self.K)
        if self.mode == "gcc":  # generated text is compressed too, its first image after the prompt's carry
            return sft_segments([], ctx, [], cont, self.K, self.n_visual, self.prompt_encoding, chunker)
        return prompt_segments([], ctx, [], self.K, self.n_visual, self.prompt_encoding, chunker) + [
            Raw(tuple(cont), loss=True)]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, split the way lm-eval's causal models split them:
        trailing spaces of the context move to the continuation, and the pair is tokenised whole."""
        if not context:
            return [self.prefix_token_id], self.processor.encode(continuation)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.processor.encode(context + continuation)
        ctx = self.processor.encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, whether greedy decoding gives the continuation) for each pair."""
        out: list[tuple[float, bool]] = []
        for i in range(0, len(pairs), self.batch_size):
            batch = pairs[i : i + self.batch_size]
            plan = collate([build_sample(self._segments(c, t)) for c, t in batch])
            pixels = (self.processor.pixels_for(plan.chunks).to(self.model.device, self.model.dtype)
                      if plan.chunks else None)
            logits = self.model(plan=plan, pixel_values=pixels).logits.float()
            labels = plan.labels.to(logits.device)
            logp = F.log_softmax(logits, dim=-1)
            for b, (_, cont) in enumerate(batch):
                sel = labels[b] != IGNORE
                tgt = labels[b][sel]
                if tgt.tolist() != list(cont):  # the plan must score exactly the continuation
                    raise RuntimeError("the layout plan does not target the continuation tokens")
                lp = logp[b][sel].gather(-1, tgt[:, None]).sum()
                greedy = bool((logits[b][sel].argmax(-1) == tgt).all())
                out.append((float(lp), greedy))
        return out

    # -- the three request types ---------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        res = []
        for i in tqdm(range(0, len(pairs), self.batch_size), desc="vist2 loglikelihood", disable=disable_tqdm):
            res += self._score(pairs[i : i + self.batch_size])
        for req, r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="vist2 loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            ids = self.processor.encode(text)
            # the whole text in one pass: the compressed layouts exist to make long documents fit
            lp = self._score([([self.prefix_token_id], ids)])[0][0] if ids else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), lp)
            out.append(lp)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        reqs = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 0.0) or 0.0) > 0
            params = SamplingParams(
                max_new_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)),
                temperature=float(kw.get("temperature", 0.0)) if sample else 0.0,
                top_p=float(kw.get("top_p", 1.0) or 1.0) if sample else 1.0,
                stop=tuple(u for u in until if u),
            ).validate()
            query = self.processor.encode(context) if context else [self.prefix_token_id]
            reqs.append(fit_to_budget(self.engine, Request(query=query, params=params, mode=self.mode),
                                      self._max_length)[0])
        out: list[str] = []
        for i in tqdm(range(0, len(reqs), self.batch_size), desc="vist2 generate_until", disable=disable_tqdm):
            out += [r.text for r in self.engine.generate(reqs[i : i + self.batch_size])]
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


def main() -> None:
    """lm-eval's own command line, with the ``vist2`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
