"""Serving linspec models with vLLM: the ``vllm.general_plugins`` entry point that registers the linspec
architectures with vLLM's model registry, the vLLM model classes that run linspec's own layers (all-linear and
hybrid), the mapping between a layer's decode state and the constant-size state pages vLLM keeps per request, the
routing of a hybrid's softmax layers and heads to vLLM's paged attention, and the split of a model over
tensor-parallel ranks by kv heads. vLLM is imported only by the modules that vLLM itself loads, so this package
imports without it; nothing else in linspec imports it except the command line.
"""
