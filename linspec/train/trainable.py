"""Which parameters a stage trains: freeze everything, add the stage's LoRA, open what ``trainable`` names."""

from __future__ import annotations

import torch

from linspec.errors import LinspecError
from linspec.train.recipe import Stage

# Name fragments of the parameters each ``trainable`` keyword opens. ``gamma`` opens the global term's own
# parameters: γ (``global_scale``) and, for presets with a decaying memory, the per-head decays (``decay_logit``).
# ``far_memory`` opens the window's far memory (``memory_feature_map``): both Hedgehog maps and the per-head
# memory bias b_h, which must train with the maps since it sets how much of the shared softmax the memory can take.
TRAINABLE_PATTERNS = {
    "gamma": ("global_scale", "decay_logit"),
    "conv": ("conv_weight",),
    "embeddings": ("embed_tokens",),
    "norms": ("norm.weight", "layernorm.weight"),
    "lm_head": ("lm_head",),
    "feature_map": ("feature_map",),
    "far_memory": ("memory_feature_map", "memory_bias", "memory_distance_exponent"),
}
# Keywords whose parameters exist only with some conversions: asking for them elsewhere is a recipe mistake.
_NO_GROUPED_TERM = "this conversion has no grouped term (grouped_term false, as in preset window-hedgehog)"
ABSENT_MESSAGES = {
    "gamma": _NO_GROUPED_TERM,
    "conv": _NO_GROUPED_TERM,
    "feature_map": "this feature map has no parameters",
    "far_memory": "this conversion has no far memory (preset window-hedgehog has one)",
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
    names = [n for n, _ in model.named_parameters()]
    for keyword, message in ABSENT_MESSAGES.items():
        if keyword in stage.trainable and not any(p in n for n in names for p in TRAINABLE_PATTERNS[keyword]):
            raise LinspecError(f"stage {stage.name}: trainable lists {keyword} but {message}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LinspecError(f"stage {stage.name}: nothing to train (trainable: {stage.trainable}, lora: {stage.lora})")
    for parameter in trainable:  # fp32 master copies of what trains; frozen weights stay in ``dtype``
        parameter.data = parameter.data.float()
    return model
