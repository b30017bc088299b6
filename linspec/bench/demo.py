"""The README's first command: fetch the demo model, convert it, generate from a prompt, compare decode speed."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from linspec.bench.decode import time_decode
from linspec.config import LinspecConfig
from linspec.data.prompts import encode_prompt
from linspec.errors import LinspecError
from linspec.evaluation.greedy import greedy_generate, stop_ids
from linspec.utils.paths import cache_root

DEMO_PROMPT = "Explain in two sentences why the sky is blue."
_SHAPE = ("vocab_size", "hidden_size", "num_hidden_layers")  # what a conversion keeps of its source's config


def default_output_dir(name: str) -> Path:
    return cache_root() / "converted" / f"{name}-window"


def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    """``(answer, seconds)``: the greedy answer to ``prompt`` as a user turn, encoded and decoded the way every
    evaluation does it (``linspec.evaluation.greedy``), so the demo shows what an evaluation would measure."""
    ids = encode_prompt(tokenizer, prompt)
    start = time.perf_counter()
    tokens = greedy_generate(model, ids, max_new_tokens, stop_ids(tokenizer, model))
    elapsed = time.perf_counter() - start
    return tokenizer.decode(tokens, skip_special_tokens=True).strip(), elapsed


def _is_demo_conversion(out: Path, original, settings: LinspecConfig) -> bool:
    """Whether ``out`` holds this demo's conversion of ``original``: the window preset's settings (an older preset's
    is converted again) and the original's shape (not another model's conversion). False for no or an unreadable
    ``config.json``."""
    try:
        config = json.loads((out / "config.json").read_text())
        cached = LinspecConfig.from_dict(config["linspec"])
    except (OSError, ValueError, KeyError, TypeError, LinspecError):
        return False
    return cached == settings and all(config.get(key) == getattr(original.config, key, None) for key in _SHAPE)


def _models(model_name: str, out: Path, trained: Path | None, console: Console, device, dtype, contexts, replace: bool):
    """``(original, tokenizer, converted)``: the source model, and the trained or (once) converted one. ``replace``:
    a directory holding something else may be converted over (the demo's own cache folder, or ``--force``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from linspec.conversion.checkpoint import convert_checkpoint
    from linspec.evaluation.lengths import check_within_positions
    from linspec.sources.loading import load_source

    if trained is not None:  # checked before anything loads
        if not (out / "config.json").is_file():
            raise LinspecError(f"--trained {out}: no model directory there (no config.json)")
        if getattr(AutoConfig.from_pretrained(out), "linspec", None) is None:
            raise LinspecError(f"--trained {out} is not a linspec model (train one: linspec train RECIPE)")
    original, tokenizer = load_source(model_name, dtype=dtype, device=device)
    if tokenizer is None:
        raise LinspecError(f"{model_name} has no tokenizer; the demo needs one for its prompt")
    check_within_positions(original, max(contexts), f"--contexts {max(contexts)}")
    settings = LinspecConfig.from_preset("window")
    if trained is not None:
        console.print(f"using the trained model in {out}")
    elif not _is_demo_conversion(out, original, settings):  # none yet, an older preset's, or another model's
        if out.exists() and any(out.iterdir()) and not replace:
            raise LinspecError(
                f"--out {out} holds a model that is not the demo's current conversion of {model_name} (another "
                "model's, another preset's or a trained one); pass --force to replace it, or choose a new directory"
            )
        console.print(
            f"converting {model_name} -> {out} (window preset: softmax over the last {settings.window_summary}, "
            f"G={settings.group_size}, P={settings.conv_taps}, γ=0, conv=0)"
        )
        convert_checkpoint(model_name, out, settings, force=out.exists())
    else:
        console.print(f"reusing the converted model in {out}")
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(device).eval()
    _check_made_from(converted, original, model_name, f"--trained {out}" if trained is not None else f"--out {out}")
    return original, tokenizer, converted


def _check_made_from(converted, original, model_name: str, where: str) -> None:
    """Refuse a converted model whose shape is not ``original``'s (a directory made from another source): the
    demo feeds both the same token ids."""
    ours, theirs = (tuple(getattr(m.config, key, None) for key in _SHAPE) for m in (converted, original))
    if ours != theirs:
        raise LinspecError(
            f"{where} holds a model of another shape than {model_name} (vocabulary, width, layers {ours} against "
            f"{theirs}); it was not made from {model_name}"
        )


def run_demo(
    model_name: str = "smollm2-135m",
    out: Path | None = None,
    prompt: str = DEMO_PROMPT,
    max_new_tokens: int = 40,
    contexts: tuple[int, ...] = (256, 4096),
    console: Console | None = None,
    trained: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    force: bool = False,
) -> dict:
    """Convert (once; reused afterwards), generate with both models, time decoding at short and long context.

    ``trained``: a linspec model made from ``model_name`` by ``linspec train`` to show instead of the raw
    conversion, whose text is poor until trained. ``force``: an ``out`` holding another model is converted over."""
    from linspec.sources.load_steps import progress_bars
    from linspec.utils.devices import placement

    target, weights = placement(device, dtype)
    console = console or Console()
    replace = force or out is None  # the default folder is the demo's own cache
    out = Path(trained or out or default_output_dir(model_name))
    console.rule(f"[bold]linspec demo: {model_name}")
    # transformers' bars for sub-second loads and saves would only interleave with the demo's own lines
    with progress_bars(False):
        original, tokenizer, converted = _models(model_name, out, trained, console, target, weights, contexts, replace)
    console.print(f"loaded {type(converted).__name__} with {len(converted.linspec_modules())} linear layers")

    console.print(f"\n[bold]prompt:[/bold] {prompt}")
    results: dict = {"prompt": prompt, "generations": {}, "decode": []}
    for name, model in (("original", original), ("converted", converted)):
        text, seconds = greedy_text(model, tokenizer, prompt, max_new_tokens)
        results["generations"][name] = text
        console.print(f"[bold]{name}[/bold] ({seconds:.1f} s): {text!r}")
    if trained is None:
        console.print(
            "[dim]The raw conversion is the original's attention within its last 512 tokens and nothing beyond "
            "until trained; `linspec train smollm2-135m-demo` trains the long-range path, then "
            "`linspec demo --trained runs/smollm2-135m-demo/model` shows it.[/dim]\n"
        )

    what = "trained model" if trained is not None else "raw conversion: its long-range path is not trained"
    table = Table(title=f"greedy decode, one token per forward (median); converted = {what}")
    for column in (
        "context",
        "original ms/token",
        "converted ms/token",
        "speed-up",
        "original cache",
        "converted cache",
    ):
        table.add_column(column, justify="right")
    generator = torch.Generator().manual_seed(0)
    for context in contexts:
        prompt_ids = torch.randint(0, original.config.vocab_size, (1, context), generator=generator).to(target)
        timings = {}
        for name, model in (("original", original), ("converted", converted)):
            _, times, nbytes = time_decode(model, prompt_ids, steps=16)
            timings[name] = (1e3 * statistics.median(times), nbytes)
        (o_ms, o_bytes), (c_ms, c_bytes) = timings["original"], timings["converted"]
        results["decode"].append({"context": context, "original_ms": o_ms, "converted_ms": c_ms})
        table.add_row(
            str(context), f"{o_ms:.1f}", f"{c_ms:.1f}", f"{o_ms / c_ms:.2f}×",
            f"{o_bytes / 2**20:.1f} MiB", f"{c_bytes / 2**20:.1f} MiB",
        )  # fmt: skip
    console.print(table)
    console.print(f"converted model: {out}\nnext: linspec generate {out} --prompt 'Hello'")
    return results
