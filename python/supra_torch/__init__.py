"""supra's models in PyTorch/transformers and its training recipes under torchrun.

    from supra_torch import SupraForCausalLM
    model = SupraForCausalLM.from_pretrained("runs/smollm2/final")   # any directory supra wrote

or, with no package installed, `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
(supra writes this model's file beside every config.json). Training: `python -m supra_torch.train`.
"""
from .modeling_supra import SupraConfig, SupraForCausalLM, SupraState

__all__ = ["SupraConfig", "SupraForCausalLM", "SupraState"]
