"""VIST2: a decoder LLM that keeps its long context as pictures of text.

Importing the package registers the model and its processor with transformers' Auto classes::

    >>> import vist2
    >>> from transformers import AutoModelForCausalLM, AutoProcessor
    >>> model = AutoModelForCausalLM.from_pretrained("runs/tiny")  # doctest: +SKIP
    >>> processor = AutoProcessor.from_pretrained("runs/tiny")     # doctest: +SKIP
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from .config import VIST2Config, preset_config
from .modeling import VIST2ForCausalLM, VIST2Model
from .processing import VIST2Processor

__version__ = "0.1.0"

AutoConfig.register(VIST2Config.model_type, VIST2Config, exist_ok=True)
AutoModel.register(VIST2Config, VIST2Model, exist_ok=True)
AutoModelForCausalLM.register(VIST2Config, VIST2ForCausalLM, exist_ok=True)
AutoProcessor.register(VIST2Config, VIST2Processor, exist_ok=True)

__all__ = ["VIST2Config", "VIST2Model", "VIST2ForCausalLM", "VIST2Processor", "preset_config"]
