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

PARALLEL_REFUSAL = (
    "linspec's vLLM plugin runs each model on one rank: its layers and state are not sharded over kv heads yet; "
    "serve with --tensor-parallel-size 1 --pipeline-parallel-size 1"
)


class LinspecModelConfig(MambaModelConfig):
    """vLLM's configuration hook for every linspec model: the state block size as for any model with constant-size
    state; speculative decoding and tensor or pipeline parallelism refused while the engine starts.

    With speculative decoding vLLM feeds each request its last token and the draft tokens in one step and keeps
    only the accepted ones; a state layer must keep a state per draft token and restart from the last accepted
    one. vLLM 0.32 passes the accepted counts and per-draft state slots only to the metadata builders of its own
    Mamba2, GDN, Bailing-linear and ShortConv layers (``GPUModelRunner``, ``extra_attn_metadata_args``), so a
    linspec layer would fold rejected drafts into its state and decode differently from plain decoding.
    """

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        if vllm_config.speculative_config is not None:
            raise NotImplementedError(SPECULATIVE_REFUSAL)
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise NotImplementedError(PARALLEL_REFUSAL)
        super().verify_and_update_config(vllm_config)


class HybridConfig(LinspecModelConfig):
    """vLLM's configuration hook for a linspec hybrid: as for every linspec model, and the hybrid class named where
    vLLM's loader looks it up."""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        super().verify_and_update_config(vllm_config)
        vllm_config.model_config.hf_config.architectures = [HYBRID_ARCHITECTURE]
