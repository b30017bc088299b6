"""``LinspecConfig``: how attention is linearized. Validated on construction, serialised into the HF config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from linspec.errors import LinspecError
from linspec.ops.kernel_fn import LOCAL_KERNELS

FEATURE_MAPS = ("l2norm", "elu1", "relu")
# Upper bounds far above any useful value (the paper: G = 64, P = 32) that stop absurd sizes before they cost
# memory: the decode state holds a G-token buffer per kv head and layer, the conv P weights per head.
MAX_GROUP_SIZE = 4096
MAX_CONV_TAPS = 1024
MAX_LAYERS = 4096
PRESETS = {
    # You et al. 2024: L2-normalised q/k, relu² inside groups of 64, 32 causal conv taps.
    "paper": {"feature_map": "l2norm", "local_kernel": "relu2", "group_size": 64, "conv_taps": 32},
    # Plain positive-feature linear attention inside the group (Katharopoulos et al.), same grouping and conv.
    "elu": {"feature_map": "elu1", "local_kernel": "identity", "group_size": 64, "conv_taps": 32},
}


@dataclass(frozen=True)
class LinspecConfig:
    """Settings of the augmented grouped linear attention (DESIGN §2). The defaults are the paper preset.

    ``softmax_layers`` keeps those decoder layers (0-based) as the model's own softmax attention: a hybrid.
    """

    group_size: int = 64
    conv_taps: int = 32
    feature_map: str = "l2norm"
    local_kernel: str = "relu2"
    softmax_layers: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name, limit in (("group_size", MAX_GROUP_SIZE), ("conv_taps", MAX_CONV_TAPS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LinspecError(f"{name} must be a positive integer, got {value!r:.40}")
            if value > limit:
                raise LinspecError(f"{name} must be at most {limit}, got {value}")
        if self.feature_map not in FEATURE_MAPS:
            raise LinspecError(f"feature_map must be one of {', '.join(FEATURE_MAPS)}; got {self.feature_map!r}")
        if self.local_kernel not in LOCAL_KERNELS:
            raise LinspecError(f"local_kernel must be one of {', '.join(LOCAL_KERNELS)}; got {self.local_kernel!r}")
        if isinstance(self.softmax_layers, (str, bytes)) or not hasattr(self.softmax_layers, "__iter__"):
            raise LinspecError(f"softmax_layers must be a list of layer indices, got {self.softmax_layers!r:.40}")
        layers = tuple(self.softmax_layers)
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_LAYERS]
        if bad:
            raise LinspecError(f"softmax_layers must be non-negative layer indices below {MAX_LAYERS}, got {_few(bad)}")
        object.__setattr__(self, "softmax_layers", tuple(sorted(set(layers))))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LinspecConfig:
        if name not in PRESETS:
            raise LinspecError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["softmax_layers"] = list(self.softmax_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinspecConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LinspecError(f"unknown linspec setting(s): {', '.join(sorted(unknown))}")
        return cls(**{**data, "softmax_layers": tuple(data.get("softmax_layers", ()))})

    def check_layers(self, num_layers: int) -> None:
        """Raise if a softmax layer index does not exist in a model with ``num_layers`` decoder layers."""
        bad = [i for i in self.softmax_layers if i >= num_layers]
        if bad:
            raise LinspecError(
                f"softmax_layers {_few(bad)} out of range: the model has {num_layers} layers (0..{num_layers - 1})"
            )

    def check_model(self, config: Any) -> None:
        """Raise if these settings do not fit a model's config: a missing layer, or G or P beyond its positions."""
        self.check_layers(int(config.num_hidden_layers))
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            for name in ("group_size", "conv_taps"):
                if getattr(self, name) > positions:
                    raise LinspecError(f"{name} {getattr(self, name)} is larger than the model's {positions} positions")


def _few(values: list, shown: int = 5) -> str:
    """A list for an error line: its first few items and how many more, never a megabyte of indices."""
    head = ", ".join(repr(v)[:20] for v in values[:shown])
    return f"[{head}{f', ... ({len(values) - shown} more)' if len(values) > shown else ''}]"
