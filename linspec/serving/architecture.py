"""Which vLLM model class serves a linspec config: all-linear conversions are attention-free for vLLM, hybrids
(softmax layers or heads, whose KV grows) are hybrid models with paged attention beside their state layers.

A saved ``config.json`` names the same Hugging Face architecture either way, while vLLM decides a model's kind
(attention-free or hybrid, and so how it sizes and pages the cache) from the class registered for that name. vLLM
lets a model type rewrite the architectures it reads from a config (``MODEL_ARCH_CONFIG_CONVERTORS``, what its
own MTP drafts use); the plugin's convertor sends hybrids to ``HYBRID_ARCHITECTURE``. vLLM's loader reads the
config's own ``architectures`` instead, so the hybrid's configuration hook (``HybridConfig``) writes the name
there too, in vLLM's copy of the config.
"""

from __future__ import annotations

from vllm.model_executor.models.config import MambaModelConfig
from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase

from linspec.serving.sharding import parallel_refusal

HYBRID_ARCHITECTURE = "LinspecHybridForCausalLM"


def keeps_softmax(config) -> bool:
    """Whether a linspec model config keeps softmax layers or softmax heads (a hybrid)."""
    settings = config.linspec_settings
    return bool(settings.softmax_layers or settings.softmax_heads)


class LinspecArchConfigConvertor(ModelArchConfigConvertorBase):
    """vLLM's reading of a linspec config, with hybrids named ``HYBRID_ARCHITECTURE``."""

    def get_architectures(self) -> list[str]:
        if keeps_softmax(self.hf_config):
            return [HYBRID_ARCHITECTURE]
        return super().get_architectures()


SPECULATIVE_REFUSAL = (
    "linspec models cannot use vLLM's speculative decoding (vLLM 0.32 rolls back rejected draft tokens in state "
    "layers only for its own Mamba2, GDN, Bailing and ShortConv backends); serve without --speculative-config"
)


class LinspecModelConfig(MambaModelConfig):
    """vLLM's configuration hook for every linspec model: the state block size as for any model with constant-size
    state; speculative decoding, pipeline parallelism and tensor-parallel sizes that do not split the kv heads evenly
    (``linspec.serving.sharding``) refused while the engine starts.

    With speculative decoding vLLM feeds each request its last token and the draft tokens in one step and keeps only the
    accepted ones; a state layer must keep a state per draft token and restart from the last accepted one. vLLM 0.32
    passes the accepted counts and per-draft state slots only to the metadata builders of its own Mamba2, GDN,
    Bailing-linear and ShortConv layers (``GPUModelRunner``, ``extra_attn_metadata_args``), so a linspec layer would
    fold rejected drafts into its state and decode differently from plain decoding."""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        if vllm_config.speculative_config is not None:
            raise NotImplementedError(SPECULATIVE_REFUSAL)
        parallel = vllm_config.parallel_config
        config = vllm_config.model_config.hf_config
        refusal = parallel_refusal(config, parallel.tensor_parallel_size, parallel.pipeline_parallel_size)
        if refusal is not None:
            raise NotImplementedError(refusal)
        super().verify_and_update_config(vllm_config)


def served_layer_types(config) -> list[str] | None:
    """A linspec config's ``layer_types`` as vLLM must read them: the linear layers named ``linear_attention``,
    the softmax layers keeping their own kind; None for architectures without ``layer_types`` (Llama, Mistral).

    Qwen2 and Qwen3 configs name every layer ``full_attention``, and vLLM takes a hybrid class whose layers are all
    attention for a plain attention model (``ModelConfig.is_hybrid``), which would leave its state pages unsized.
    """
    kinds = getattr(config, "layer_types", None)
    if kinds is None:
        return None
    softmax = set(config.linspec_settings.softmax_layers)
    return [kind if index in softmax else "linear_attention" for index, kind in enumerate(kinds)]


class HybridConfig(LinspecModelConfig):
    """vLLM's configuration hook for a linspec hybrid: as for every linspec model, the hybrid class named where
    vLLM's loader looks it up, and the linear layers named as such in ``layer_types`` (``served_layer_types``)."""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        super().verify_and_update_config(vllm_config)
        config = vllm_config.model_config.hf_config
        config.architectures = [HYBRID_ARCHITECTURE]
        kinds = served_layer_types(config)
        if kinds is not None:
            config.layer_types = kinds
