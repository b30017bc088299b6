"""Which parameters a stage trains: freeze everything, add the stage's LoRA, open what ``trainable`` names."""

from __future__ import annotations

import torch

from linspec.errors import LinspecError
from linspec.train.recipe import Stage

# Name fragments of the parameters each ``trainable`` keyword opens. ``gamma`` opens the global term's own
# parameters: γ (``global_scale``) and, for presets with a decaying memory, the per-head decays (``decay_logit``).
TRAINABLE_PATTERNS = {
    "gamma": ("global_scale", "decay_logit"),
    "conv": ("conv_weight",),
    "embeddings": ("embed_tokens",),
    "norms": ("norm.weight", "layernorm.weight"),
    "lm_head": ("lm_head",),
    "feature_map": ("feature_map",),
}


def set_trainable(model, stage: Stage, dtype: torch.dtype, seed: int):
    """Freeze everything, add the stage's LoRA (peft), open the listed parameters; trainables kept in fp32."""
    model.requires_grad_(False)
    if stage.lora is not None:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # LoRA's A matrices are random: the same seed gives the same run
        config = LoraConfig(
            r=stage.lora.r,
            lora_alpha=stage.lora.alpha,
            lora_dropout=stage.lora.dropout,
            target_modules=list(stage.lora.targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    patterns = [p for name in stage.trainable if name != "all" for p in TRAINABLE_PATTERNS[name]]
    for name, parameter in model.named_parameters():
        if stage.kind == "full" or "all" in stage.trainable or any(p in name for p in patterns):
            parameter.requires_grad_(True)
        if "lora_" in name:
            parameter.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LinspecError(f"stage {stage.name}: nothing to train (trainable: {stage.trainable}, lora: {stage.lora})")
    if "feature_map" in stage.trainable and not any("feature_map" in n for n, _ in model.named_parameters()):
        raise LinspecError(f"stage {stage.name}: trainable lists feature_map but this feature map has no parameters")
    for parameter in trainable:  # fp32 master copies of what trains; frozen weights stay in ``dtype``
        parameter.data = parameter.data.float()
    return model
