"""VIST2: a decoder LLM that keeps its long context as pictures of text.

Importing the package registers the model with transformers' Auto classes::

    >>> import vist2
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("runs/tiny")  # doctest: +SKIP
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import VIST2Config, preset_config
from .modeling import VIST2ForCausalLM, VIST2Model

__version__ = "0.1.0"

AutoConfig.register(VIST2Config.model_type, VIST2Config, exist_ok=True)
AutoModel.register(VIST2Config, VIST2Model, exist_ok=True)
AutoModelForCausalLM.register(VIST2Config, VIST2ForCausalLM, exist_ok=True)

__all__ = ["VIST2Config", "VIST2Model", "VIST2ForCausalLM", "preset_config"]
