"""Per-sequence next-token choice: greedy or seeded sampling behind transformers' logits processors.

Example::

    >>> import torch
    >>> from vist2.engine.sampling import Sampler, SamplingParams
    >>> logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    >>> Sampler(SamplingParams())(logits, history=[0, 2])  # greedy
    1
    >>> Sampler(SamplingParams(repetition_penalty=4.0))(logits, history=[1])  # 3/4 < 2: token 1 loses
    3
    >>> s = SamplingParams(temperature=0.8, top_p=0.9, seed=0)
    >>> Sampler(s)(logits, [0]) == Sampler(s)(logits, [0])
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..checks import is_int as _is_int


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1 -> off; HF rule: a seen token's logit is divided (>0) or multiplied (<0)
    # 0 -> off. Endless loops are the most reported failure of optical-compression models; blocking any
    # repeated n-gram is the cheap guard against them.
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = ()  # stop strings, not included in the output
    stop_token_ids: tuple[int, ...] = ()  # e.g. EOS ids; the engine fills in the tokenizer's EOS
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        """Raise ``ValueError`` naming the first bad field; return ``self`` so calls can be chained."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        # `not x >= 0` also rejects NaN
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an int >= 0 (0 = off), got {self.no_repeat_ngram_size!r}")
        # a bare str is a Sequence too; stop="\n\n" would otherwise mean the stop strings "\n" and "\n"
        if isinstance(self.stop, (str, bytes)) or not isinstance(self.stop, Sequence):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, Sequence) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a sequence of ints >= 0, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks the next token of ONE sequence.

    ``history`` is every token id of the sequence so far (prompt + generated): the repetition processors
    look at all of it, as in ``model.generate``. It is only turned into a tensor when one of them is on.
    """

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params.validate()
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

        self.processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
        if params.no_repeat_ngram_size > 0:
            self.processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
        self.needs_history = len(self.processors) > 0

        # same order as transformers' generate: temperature, then the truncations
        self.warpers = LogitsProcessorList()
        if not params.greedy:
            if params.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_k > 0:
                self.warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(float(params.top_p)))

    def processed(self, logits_V: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """The 1-D logits after the repetition processors and, when sampling, the warpers (-inf = banned)."""
        if logits_V.dim() != 1:
            raise ValueError(f"logits_V must be 1-D, got shape {tuple(logits_V.shape)}")
        # float32: the warpers' softmax/cumsum and multinomial are unreliable or unsupported in half precision;
        # the copy also keeps the in-place processors off the caller's tensor
        scores = logits_V.detach().to(torch.float32, copy=True).unsqueeze(0)
        if self.needs_history:
            ids = torch.as_tensor(history, dtype=torch.long, device=scores.device).reshape(1, -1)
            scores = self.processors(ids, scores)
        if self.warpers:
            # the warpers ignore input_ids; an empty one saves building the history tensor
            scores = self.warpers(scores.new_zeros((1, 0), dtype=torch.long), scores)
        return scores[0]

    def __call__(self, logits_V: torch.Tensor, history: Sequence[int]) -> int:
        if self.params.greedy and not self.needs_history and logits_V.dim() == 1:
            return int(logits_V.argmax())  # plain greedy: no copy of the vocabulary-sized row
        scores = self.processed(logits_V, history)
        if self.params.greedy:
            return int(scores.argmax())
        probs = torch.softmax(scores, dim=-1).to(self.generator.device)
        return int(torch.multinomial(probs, 1, generator=self.generator))
