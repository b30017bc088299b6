"""The architecture as the tests hold it: packages in layers that import one way, no import cycles, and one module
that touches transformers internals.

The import graph is read from the source (every ``import`` statement, at module level or inside a function), so an
import hidden in a function to dodge a cycle counts like any other. A package may import its own modules, the
packages of lower layers and, within its layer, a sibling package as long as no cycle forms.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "linspec"

# Lower layers never import higher ones (docs/design.md, "Layout").
LAYERS = [
    ["linspec.errors", "linspec.config", "linspec.utils", "linspec.recipes"],
    ["linspec.ops"],
    ["linspec.models"],
    ["linspec.sources", "linspec.data"],
    ["linspec.evaluation", "linspec.speculative"],
    ["linspec.conversion"],
    ["linspec.drafting"],
    ["linspec.train"],
    ["linspec.bench", "linspec.serving"],
    ["linspec.cli", "linspec.__main__"],
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
# The package's own ``__init__`` only names the public API, loaded on first use, and registers the Auto classes.
FACADE = "linspec"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The linspec module an imported dotted name lives in (``linspec.ops.chunked.grouped_terms`` → the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
        else:
            continue
        found |= {target for name in names if name.startswith("linspec") and (target := resolve(name))}
    return found - {module}


GRAPH = {module: imports_of(module) for module in MODULES}


def layer_of(module: str) -> str:
    for package in sorted(RANK, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS (and to docs/design.md)")


def test_every_module_belongs_to_a_layer():
    for module in MODULES:
        if module != FACADE:
            layer_of(module)


def test_no_module_imports_a_higher_layer():
    upward = sorted(
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in GRAPH.items()
        if module != FACADE
        for target in targets
        if target != FACADE and RANK[layer_of(target)] > RANK[layer_of(module)]
    )
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (iterative: the graph is a few hundred modules deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    graph = {module: {t for t in targets if t != FACADE} for module, targets in GRAPH.items() if module != FACADE}
    assert strongly_connected(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


# transformers' public API is everything its top level exports; a module path below it is an internal.
PUBLIC_TRANSFORMERS = {"transformers", "transformers.utils.logging"}
HF_MODULE = "linspec.models.hf"
INTERNAL_SUBMODULES = {"models", "modeling_utils", "cache_utils", "integrations", "generation", "pytorch_utils"}
# Attribute names that belong to transformers' internals, not its API: reaching one outside the hf module ties that
# module to how this transformers release builds its models. ``get_input_embeddings``/``get_output_embeddings`` and
# ``config`` are the public way in and stay allowed everywhere.
INTERNAL_ATTRIBUTES = {
    # the decoder a causal LM wraps: public as a method, but what it holds is each architecture's own layout
    "get_decoder",
    # the decoder's modules, named by each modeling file (Llama, Mistral, Qwen2, Qwen3 agree today, others do not)
    "layers",
    "embed_tokens",
    "rotary_emb",
    # a decoder layer's attention module
    "self_attn",
    # the config's attention implementation: private, set by ``from_pretrained``
    "_attn_implementation",
    # ``generate``'s private hook that builds the cache; overriding it is how a model decodes with its own cache
    "_prepare_cache_for_generation",
}


def internal_contacts(source: str) -> list[str]:
    """The transformers internals ``source`` touches: imports of modules below ``transformers``, its internal
    submodules as attributes, attributes named in ``INTERNAL_ATTRIBUTES`` and methods defined under such a name.

    An object's own attribute (``self.layers``) is not counted: a subclass of a transformers class that the hf module
    exports (a ``Cache``) keeps its state there, and linspec's own classes may choose such names.
    """
    internal = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        internal += [n for n in names if n.startswith("transformers.") and n not in PUBLIC_TRANSFORMERS]
        if isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner == "transformers" and node.attr in INTERNAL_SUBMODULES:
                internal.append(f"transformers.{node.attr}")
            if owner != "self" and node.attr in INTERNAL_ATTRIBUTES:
                internal.append(f".{node.attr} (line {node.lineno})")
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in INTERNAL_ATTRIBUTES:
            internal.append(f"def {node.name} (line {node.lineno})")
    return internal


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_hf_module_touches_transformers_internals(module):
    if module == HF_MODULE:
        return
    internal = internal_contacts(MODULES[module].read_text())
    assert not internal, f"{module} reaches into {sorted(set(internal))}: go through {HF_MODULE}"


def test_the_internals_check_finds_each_kind_of_contact():
    """Each kind of contact the test above refuses, on code written the way linspec once had it."""
    assert internal_contacts("from transformers.cache_utils import DynamicLayer")
    assert internal_contacts("import transformers\ntransformers.models.llama")
    assert internal_contacts("layers = model.model.layers")
    assert internal_contacts("norm = model.get_decoder().norm")
    assert internal_contacts("layer.self_attn = wrap(layer.self_attn, model.model.rotary_emb)")
    assert internal_contacts("hidden = parts.embed_tokens(tokens)")
    assert internal_contacts("config._attn_implementation = base._attn_implementation")
    assert internal_contacts("class M:\n    def _prepare_cache_for_generation(self, *args): ...")
    assert internal_contacts("super()._prepare_cache_for_generation(config, kwargs)")
    assert not internal_contacts("from transformers import AutoModelForCausalLM\nmodel.get_output_embeddings()")
    assert not internal_contacts("self.layers[index].state = state")  # a Cache subclass's own state
