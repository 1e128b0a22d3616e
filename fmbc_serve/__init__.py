"""fmbc-serve: FMBC models (fixed minimal binary token codes instead of an input embedding table) for
transformers, vLLM and SGLang.

Importing the package registers the config and model with transformers' Auto classes, so a checkpoint loads
through the installed package without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .binary_code import BinaryCode, code_bits, random_affine
from .configuration_fmbc import FMBCConfig
from .modeling_fmbc import FMBCForCausalLM, FMBCModel

__version__ = "0.1.0"
__all__ = ["BinaryCode", "FMBCConfig", "FMBCForCausalLM", "FMBCModel", "code_bits", "random_affine"]

AutoConfig.register(FMBCConfig.model_type, FMBCConfig, exist_ok=True)
AutoModel.register(FMBCConfig, FMBCModel, exist_ok=True)
AutoModelForCausalLM.register(FMBCConfig, FMBCForCausalLM, exist_ok=True)
