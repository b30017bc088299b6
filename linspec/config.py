"""``LinspecConfig``: how attention is linearized. Validated on construction, serialised into the HF config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from linspec.errors import LinspecError
from linspec.utils.validation import check_count, is_count

# How the global memory's readout is normalised (``linspec.ops.memory``); here so that settings load without torch.
GLOBAL_NORMS = ("none", "mean", "key")
# The base ``model_type`` values ``linspec convert`` accepts (``linspec.models.modeling.ARCHITECTURES`` holds their
# classes; a test keeps the two equal). Named here so that ``linspec convert --help`` needs no transformers import.
BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

FEATURE_MAPS = ("l2norm", "elu1", "relu")
# The local term: κ(q̂·k̂) inside the group (relu2: the paper; identity), or the pretrained softmax over a sliding
# window with attention sinks (softmax: ``linspec.ops.window``), which replaces the in-group term.
LOCAL_KERNELS = ("relu2", "identity", "softmax")
SINK_POSITIONS = ("absolute", "adjacent")
# The far memory's feature map (``linspec.ops.far_memory``): none, Hedgehog's learnable one, or its parameter-free
# form (Liger). It is a column of the softmax window, so it needs ``local_kernel: softmax``.
MEMORY_FEATURE_MAPS = ("none", "hedgehog", "softmax")
# How the sparse cache (``linspec.ops.sparse_cache``) picks the evicted tokens it keeps exactly: those the far memory
# recalls worst (LoLA), the most recent, or a fixed pseudo-random choice (the last two: baselines at equal memory).
SPARSE_CACHE_POLICIES = ("recall-error", "recency", "random")
MAX_SPARSE_CACHE = 65536
# Settings that hold a name (checked for text before anything else reads them).
_NAMED_SETTINGS = ("feature_map", "local_kernel", "global_norm", "sink_positions", "memory_feature_map")
# Maps whose q̂·k̂ is never negative, so the "key" normaliser q̂ᵀz cannot vanish or flip sign.
POSITIVE_FEATURE_MAPS = ("elu1", "relu")
_PAPER = {"feature_map": "l2norm", "local_kernel": "relu2", "group_size": 64, "conv_taps": 32}
# Upper bounds far above any useful value (the paper: G = 64, P = 32) that stop absurd sizes before they cost
# memory: the decode state holds a G-token buffer per kv head and layer, the conv P weights per head.
MAX_GROUP_SIZE = 4096
MAX_CONV_TAPS = 1024
MAX_LOCAL_WINDOW = 65536
MAX_SINK_TOKENS = 1024
MAX_LAYERS = 4096
MAX_HEADS = 4096
PRESETS = {
    # You et al. 2024: L2-normalised q/k, relu² inside groups of 64, 32 causal conv taps. S an unbounded sum.
    "paper": dict(_PAPER),
    # Plain positive-feature linear attention inside the group (Katharopoulos et al.), same grouping and conv.
    "elu": {"feature_map": "elu1", "local_kernel": "identity", "group_size": 64, "conv_taps": 32},
    # Recommended: the paper's layer with S a decay-weighted mean over the folded tokens (bounded at any length).
    "stable": {**_PAPER, "global_decay": True, "global_norm": "mean"},
    # The stable memory with the pretrained softmax over the last 512 tokens and 4 attention sinks (placed right
    # before the window) as the local term: a fresh conversion is already close to the original (docs/training.md).
    "window": {
        **_PAPER, "local_kernel": "softmax", "local_window": 512, "sink_tokens": 4, "sink_positions": "adjacent",
        "global_decay": True, "global_norm": "mean",
    },
    # The window with a far memory under its softmax: the tokens that leave the window fold into a linear memory
    # with Hedgehog feature maps, read as one more column of the window's softmax (LoLCATs), its tokens weighed by
    # their distance. The maps start at the identity and the distance exponent at 0; they and the per-head bias
    # are what attention transfer trains.
    # The grouped term (γ·S and the conv) is left out: beside a far memory it never earned its place (trained with
    # it, γ and the conv stay at zero), and its state and decode time go to the sparse cache instead.
    # The sinks keep their true distance: this layer reads tokens past the window (the memory by their distance, a
    # sparse cache at their true positions), and sinks scored as if right before the window would outbid every one
    # of them: with adjacent sinks the far-memory recipe lost 2 of the 9 passkeys the original reads at 2048 tokens
    # (docs/training.md).
    "window-hedgehog": {
        **_PAPER, "local_kernel": "softmax", "local_window": 512, "sink_tokens": 4, "sink_positions": "absolute",
        "memory_feature_map": "hedgehog", "memory_distance_decay": True, "grouped_term": False,
    },
    # The paper's layer with a learnable per-head decay of S only.
    "decay": {**_PAPER, "global_decay": True},
    # The paper's layer with S divided by the number of folded tokens only.
    "mean": {**_PAPER, "global_norm": "mean"},
    # Classic normalised linear attention for the global term: elu+1 features, S and its denominator q̂ᵀz decay.
    "normalized": {
        "feature_map": "elu1", "local_kernel": "identity", "group_size": 64, "conv_taps": 32,
        "global_decay": True, "global_norm": "key",
    },
}  # fmt: skip
# What ``linspec convert`` and a recipe's ``conversion.preset`` use when none is named: the recommended window
# (a raw conversion already writes the original's text within the window, and nothing collapses past it).
DEFAULT_PRESET = "window"


@dataclass(frozen=True)
class LinspecConfig:
    """Settings of the augmented grouped linear attention (docs/design.md §2). The defaults are the paper preset.

    ``softmax_layers`` keeps those decoder layers (0-based) as the model's own softmax attention: a hybrid.
    ``softmax_heads`` keeps single kv heads of linear layers, as ``(layer, kv head)`` pairs: each such head (and
    the query heads that read it) attends with the pretrained softmax over the whole context, like a softmax
    layer, while the layer's other heads stay linear. The heads a linear layer cannot stand in for (those whose
    attention lies far outside its local span) are a few, spread over many layers (DuoAttention, Xiao et al.
    2024, splits heads the same way), so a hybrid by heads keeps them for the KV cache of a few layers, where a
    hybrid by layers must keep every head of each layer it touches (``linspec.conversion.softmax_heads`` measures
    which).

    The global term's memory S (``linspec.ops.memory``). The paper's S is an unnormalised sum over every complete
    group, so its size grows with the context: a model trained on short windows sees it swamp the layer past its
    training length. Two options bound it:

    * ``global_decay``: ``S_g = λ_h S_{g−1} + ΔS_g`` once per folded group, λ_h = sigmoid(``decay_logit``) per kv
      head, learnable, initialised to horizons ``1/(1−λ)`` spread geometrically from 4 to 256 groups.
    * ``global_norm``: ``"mean"`` divides by the (decay-weighted) number of folded tokens — safe with any feature
      map; ``"key"`` divides by ``q̂ᵀz`` (z = Σ k̂, decayed like S), which needs a positive feature map
      (``elu1``; ``relu`` is non-negative, its zero denominators meet zero numerators): under L2 features q̂ᵀz
      can be zero or negative. Shifting the L2 map to make it positive would have to bend the pretrained
      angles for every pair to be safe, so the positive option is elu+1. Both add ``eps`` (1e-6).

    The local term: ``local_kernel`` ``relu2``/``identity`` is κ(q̂·k̂) inside the group; ``softmax`` replaces it
    by the pretrained softmax (``q·k/√d`` before φ) over the last ``local_window`` tokens plus the first
    ``sink_tokens`` (``linspec.ops.window``), so a fresh conversion keeps the parent's attention wherever the context
    fits in the window. ``sink_positions`` ``"adjacent"`` scores the sinks that have left the window as if they
    sat right before it (their RoPE distance frozen), which makes the window term the same at every position past
    ``local_window + sink_tokens`` — the perplexity curve of a window whose memory carries little cannot drift
    upwards with context; ``"absolute"`` keeps their true distance, which a layer that reads evicted tokens (a far
    memory, a sparse cache: ``window-hedgehog``) needs, or its sinks, nearer than any of them, outbid them.

    The far memory (``memory_feature_map``, ``linspec.ops.far_memory``; softmax window only): the tokens that
    leave the window (sinks excepted) fold into ``S = Σ φ(k) vᵀ`` and ``z = Σ φ(k)`` per kv head, and each query
    reads them as one more column of the window's softmax, weighing an evicted token ``e^{b_h} φ(q)ᵀφ(k)`` against
    the window's ``exp(q·k/√d)`` — one shared normaliser, as LoLCATs does, instead of a separately averaged term.
    ``hedgehog``: ``φ(x) = [softmax(xA), softmax(−xA)]`` with ``A`` learnable per head (identity at conversion);
    ``softmax``: ``A = I``, no parameters. Inside the window nothing is evicted, so the layer there is the window
    alone. The ``window-hedgehog`` preset is the ``window`` preset with it. ``memory_distance_decay`` weighs the
    column as if each far token weighed ``(d / local_window)^(−α_h)`` by its distance ``d`` (``α_h`` learnt per
    head, 0 at conversion): the parent's attention to far tokens changes with distance, so its far mass grows with
    the context otherwise than the count of folded tokens, and a memory fitted on short sequences can keep its
    weight right on long ones.

    ``grouped_term`` false leaves the paper's grouped linear attention (γ·S, the conv; ``linspec.models.terms.
    grouped``) out of a layer whose local term is the softmax window: the window, its far memory and its sparse
    cache are then the whole layer, with no ``global_scale``, ``conv_weight`` or ``decay_logit`` and no state of
    theirs. The ``window-hedgehog`` preset does so: there the far memory is the layer's linear attention.

    The sparse cache (``sparse_cache`` K, ``linspec.ops.sparse_cache``; softmax window only; LoLA, McDermott et al.
    2025): per kv head, the K evicted tokens chosen by ``sparse_cache_policy`` (``recall-error``: those the far
    memory recalls worst, ``‖v‖²`` without one; ``recency``; ``random``) stay as exact keys and values, read with
    the window's own logits in its softmax; the others fold into the far memory (or are dropped without one).
    Training-free: the training forward (training mode, no decode cache) ignores the cache (the layer trains as
    the window and its memory alone); every other forward follows it exactly. It adds ``K · (Dk + Dv + 2)``
    numbers per kv head and layer to the decode state, whatever the context length.

    Recommended: the ``window`` preset — the softmax window (512 tokens, 4 adjacent sinks) with the ``stable``
    memory. The ``stable`` preset keeps the paper's φ and κ (so conversion and local attention are unchanged)
    with decay *and* mean. The mean keeps the global term the size of one value at every length, for any
    feature map, without relying on training to find a small enough λ (decay alone with λ near 1 still lets S
    grow to 1/(1−λ) groups' worth, far past what a short training window showed); the decay turns the uniform
    mean, which would dilute recent context over a long prompt, into a per-head recency-weighted one.
    ``LinspecConfig()`` itself holds the ``paper`` values (exact, one flag away: ``--preset paper``), while the
    command line and recipes default to ``DEFAULT_PRESET``; ``decay``, ``mean`` and ``normalized`` (elu+1 with
    ``key``) are the single options. Whatever the preset, train on sequences long enough for the global path to
    matter.
    """

    group_size: int = 64
    conv_taps: int = 32
    feature_map: str = "l2norm"
    local_kernel: str = "relu2"
    softmax_layers: tuple[int, ...] = field(default_factory=tuple)
    softmax_heads: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    global_decay: bool = False
    global_norm: str = "none"
    local_window: int = 0
    sink_tokens: int = 0
    sink_positions: str = "absolute"
    memory_feature_map: str = "none"
    memory_distance_decay: bool = False
    grouped_term: bool = True
    sparse_cache: int = 0
    sparse_cache_policy: str = "recall-error"

    def __post_init__(self) -> None:
        # The kernel and map names first: the window and memory checks below are phrased in terms of them, and
        # would blame a misspelt kernel on the window settings that go with the right one.
        if self.feature_map not in FEATURE_MAPS:
            raise LinspecError(f"feature_map must be one of {', '.join(FEATURE_MAPS)}; got {self.feature_map!r:.40}")
        if self.local_kernel not in LOCAL_KERNELS:
            raise LinspecError(f"local_kernel must be one of {', '.join(LOCAL_KERNELS)}; got {self.local_kernel!r:.40}")
        self._check_global_memory()
        self._check_window()
        self._check_sparse_cache()
        check_count(self.group_size, "group_size", 1, MAX_GROUP_SIZE)
        check_count(self.conv_taps, "conv_taps", 1, MAX_CONV_TAPS)
        if isinstance(self.softmax_layers, (str, bytes)) or not hasattr(self.softmax_layers, "__iter__"):
            raise LinspecError(f"softmax_layers must be a list of layer indices, got {self.softmax_layers!r:.40}")
        layers = tuple(self.softmax_layers)
        bad = [i for i in layers if not is_count(i, 0, MAX_LAYERS - 1)]
        if bad:
            raise LinspecError(f"softmax_layers must be non-negative layer indices below {MAX_LAYERS}, got {_few(bad)}")
        object.__setattr__(self, "softmax_layers", tuple(sorted(set(layers))))
        self._check_softmax_heads()

    def _check_softmax_heads(self) -> None:
        heads = self.softmax_heads
        if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
            raise LinspecError(f"softmax_heads must be a list of [layer, kv head] pairs, got {heads!r:.40}")
        pairs = []
        for pair in heads:
            if isinstance(pair, (str, bytes)) or not hasattr(pair, "__iter__") or len(tuple(pair)) != 2:
                raise LinspecError(f"softmax_heads must be a list of [layer, kv head] pairs, got {pair!r:.40}")
            layer, head = tuple(pair)
            for value, limit in ((layer, MAX_LAYERS), (head, MAX_HEADS)):
                if not is_count(value, 0, limit - 1):
                    raise LinspecError(f"softmax_heads entries must be non-negative indices, got {pair!r:.40}")
            pairs.append((layer, head))
        inside = sorted({layer for layer, _ in pairs if layer in self.softmax_layers})
        if inside:
            raise LinspecError(
                f"softmax_heads name heads of softmax layers {_few(inside)}; every head of a softmax layer already is"
            )
        object.__setattr__(self, "softmax_heads", tuple(sorted(set(pairs))))

    def heads_of(self, layer: int) -> tuple[int, ...]:
        """The kv heads of linear layer ``layer`` kept as softmax attention (``softmax_heads``), sorted."""
        return tuple(head for at, head in self.softmax_heads if at == layer)

    def _check_sparse_cache(self) -> None:
        check_count(self.sparse_cache, "sparse_cache", 0, MAX_SPARSE_CACHE)
        if self.sparse_cache_policy not in SPARSE_CACHE_POLICIES:
            raise LinspecError(
                f"sparse_cache_policy must be one of {', '.join(SPARSE_CACHE_POLICIES)}; "
                f"got {self.sparse_cache_policy!r:.40}"
            )
        if self.sparse_cache and self.local_kernel != "softmax":
            raise LinspecError(
                f"sparse_cache needs local_kernel 'softmax' (the cached tokens are columns of the window's softmax); "
                f"got local_kernel {self.local_kernel!r}"
            )
        if not self.sparse_cache and self.sparse_cache_policy != "recall-error":
            raise LinspecError(
                f"sparse_cache_policy {self.sparse_cache_policy!r} needs sparse_cache >= 1 (tokens kept per kv head)"
            )

    def _check_window(self) -> None:
        check_count(self.local_window, "local_window", 0, MAX_LOCAL_WINDOW)
        check_count(self.sink_tokens, "sink_tokens", 0, MAX_SINK_TOKENS)
        if self.local_kernel == "softmax" and self.local_window < 1:
            raise LinspecError("local_kernel 'softmax' needs local_window >= 1 (tokens each token attends to)")
        if self.sink_positions not in SINK_POSITIONS:
            raise LinspecError(
                f"sink_positions must be one of {', '.join(SINK_POSITIONS)}; got {self.sink_positions!r:.40}"
            )
        if self.local_kernel != "softmax" and (
            self.local_window or self.sink_tokens or self.sink_positions != "absolute"
        ):
            raise LinspecError(
                "local_window, sink_tokens and sink_positions belong to local_kernel 'softmax'; "
                f"got local_kernel {self.local_kernel!r}"
            )
        if self.memory_feature_map not in MEMORY_FEATURE_MAPS:
            raise LinspecError(
                f"memory_feature_map must be one of {', '.join(MEMORY_FEATURE_MAPS)}; "
                f"got {self.memory_feature_map!r:.40}"
            )
        if not isinstance(self.memory_distance_decay, bool):
            raise LinspecError(f"memory_distance_decay must be true or false, got {self.memory_distance_decay!r:.40}")
        if self.memory_distance_decay and self.memory_feature_map == "none":
            raise LinspecError("memory_distance_decay scales the far memory's column; it needs a memory_feature_map")
        if not isinstance(self.grouped_term, bool):
            raise LinspecError(f"grouped_term must be true or false, got {self.grouped_term!r:.40}")
        if not self.grouped_term and self.local_kernel != "softmax":
            raise LinspecError(
                f"grouped_term false needs local_kernel 'softmax' (the window is then the layer's only term); "
                f"got local_kernel {self.local_kernel!r}"
            )
        if not self.grouped_term and (self.global_decay or self.global_norm != "none"):
            raise LinspecError(
                "global_decay and global_norm shape the grouped term's memory; with grouped_term false there is none"
            )
        if self.memory_feature_map != "none" and self.local_kernel != "softmax":
            raise LinspecError(
                f"memory_feature_map {self.memory_feature_map!r} needs local_kernel 'softmax' (the far memory is a "
                f"column of the window's softmax); got local_kernel {self.local_kernel!r}"
            )

    @property
    def softmax_window(self) -> bool:
        """Whether the local term is the softmax window (``linspec.ops.window``) rather than the in-group κ."""
        return self.local_kernel == "softmax"

    @property
    def far_memory(self) -> bool:
        """Whether the window keeps a far memory of the tokens that leave it (``memory_feature_map``)."""
        return self.memory_feature_map != "none"

    @property
    def in_group_kernel(self) -> str:
        """κ the grouped linear attention applies inside each group (``linspec.ops``): ``local_kernel`` itself, or
        ``"none"`` when ``local_kernel`` is ``"softmax"``. The softmax window is then the layer's local term in the
        in-group term's place, and the grouped ops compute only the global memory and the conv. ``local_kernel``
        keeps the name the user chose (saved configs say ``"softmax"``); this is where it is read for the ops."""
        return "none" if self.softmax_window else self.local_kernel

    @property
    def window_summary(self) -> str:
        """``"512 tokens + 4 adjacent sinks"`` for a softmax window (what a summary line or a model card shows);
        empty without one."""
        if not self.softmax_window:
            return ""
        return f"{self.local_window} tokens + {self.sink_tokens} {self.sink_positions} sinks"

    @property
    def grouped_summary(self) -> str:
        """``"G=64, P=32"``: the grouped term's group size and conv taps for a summary line, or ``"no grouped
        term"`` where the settings leave it out (its G and P then mean nothing)."""
        return f"G={self.group_size}, P={self.conv_taps}" if self.grouped_term else "no grouped term"

    @property
    def sparse_cache_summary(self) -> str:
        """``"64 tokens per kv head (recall-error)"`` for a sparse cache (a summary line, a model card); empty
        without one."""
        if not self.sparse_cache:
            return ""
        return f"{self.sparse_cache} tokens per kv head ({self.sparse_cache_policy})"

    def _check_global_memory(self) -> None:
        if not isinstance(self.global_decay, bool):
            raise LinspecError(f"global_decay must be true or false, got {self.global_decay!r}")
        if self.global_norm not in GLOBAL_NORMS:
            raise LinspecError(f"global_norm must be one of {', '.join(GLOBAL_NORMS)}; got {self.global_norm!r}")
        if self.global_norm == "key" and self.feature_map not in POSITIVE_FEATURE_MAPS:
            raise LinspecError(
                f"global_norm 'key' divides by q̂ᵀz and needs a positive feature map "
                f"({', '.join(POSITIVE_FEATURE_MAPS)}); got {self.feature_map!r} (or use global_norm 'mean')"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LinspecConfig:
        if not isinstance(name, str) or name not in PRESETS:
            raise LinspecError(f"unknown preset {name!r:.40}; known presets: {', '.join(PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise LinspecError(f"unknown linspec setting(s): {', '.join(unknown)[:200]}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["softmax_layers"] = list(self.softmax_layers)
        data["softmax_heads"] = [list(pair) for pair in self.softmax_heads]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinspecConfig:
        """The settings a ``config.json`` ("linspec") or a recipe holds, type-checked: a file edited by hand (a
        list for the section, text for a size, a number for a list) is one ``LinspecError``, never a traceback."""
        if not isinstance(data, dict):
            raise LinspecError(f"the linspec settings must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise LinspecError(f"unknown linspec setting(s): {', '.join(unknown)[:200]}")
        names = (
            "feature_map",
            "local_kernel",
            "global_norm",
            "sink_positions",
            "memory_feature_map",
            "sparse_cache_policy",
        )
        for name in names:
            if name in data and not isinstance(data[name], str):
                raise LinspecError(f"{name} must be a name (text), got {data[name]!r:.40}")
        for name in ("softmax_layers", "softmax_heads"):
            if not isinstance(data.get(name, []), (list, tuple)):
                raise LinspecError(f"{name} must be a list, got {data[name]!r:.40}")
        return cls(**{**data, "softmax_layers": tuple(data.get("softmax_layers", ()))})  # heads: pairs in any form

    def check_layers(self, num_layers: int) -> None:
        """Raise if a softmax layer index does not exist in a model with ``num_layers`` decoder layers."""
        bad = [i for i in self.softmax_layers if i >= num_layers]
        heads = [list(pair) for pair in self.softmax_heads if pair[0] >= num_layers]
        if heads:
            raise LinspecError(
                f"softmax_heads {_few(heads)} out of range: the model has {num_layers} layers (0..{num_layers - 1})"
            )
        if bad:
            raise LinspecError(
                f"softmax_layers {_few(bad)} out of range: the model has {num_layers} layers (0..{num_layers - 1})"
            )

    def check_model(self, config: Any) -> None:
        """Raise if these settings do not fit a model's config: a missing layer or kv head, or G or P beyond its
        positions."""
        self.check_layers(int(config.num_hidden_layers))
        kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        bad = [list(pair) for pair in self.softmax_heads if isinstance(kv_heads, int) and pair[1] >= kv_heads]
        if bad:
            raise LinspecError(f"softmax_heads {_few(bad)} out of range: the model has {kv_heads} kv heads per layer")
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            for name in ("group_size", "conv_taps"):
                if getattr(self, name) > positions:
                    raise LinspecError(f"{name} {getattr(self, name)} is larger than the model's {positions} positions")


def _few(values: list, shown: int = 5) -> str:
    """A list for an error line: its first few items and how many more, never a megabyte of indices."""
    head = ", ".join(repr(v)[:20] for v in values[:shown])
    return f"[{head}{f', ... ({len(values) - shown} more)' if len(values) > shown else ''}]"
