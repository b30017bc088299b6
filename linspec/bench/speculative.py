"""``linspec bench speculative``: speculative vs plain decoding of the same target, and vs HF assisted generation.

Targets: the demo model (original) and its raw paper-preset conversion (in memory, γ = conv = 0, untrained).
For each prompt, every setting generates up to ``--max-new-tokens`` tokens (stopping at EOS) from one prompt;
its end-to-end tokens/s (prefill included) is divided by that of plain ``generate()`` of the same target, in the
same mode (greedy or temperature 1), measured in the same block. Greedy rows also check that the tokens are
identical to plain greedy decoding. Each greedy setting runs ``--repeats`` times and the fastest run counts;
each sampled setting runs ``--sample-repeats`` times with seeds 0, 1, … and the mean counts (its speed depends
on which text was drawn far more than on timing noise). All runs use
``--threads`` intra-op threads (1 by default: on a shared 2-core CPU a second thread costs more than it brings).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from rich.console import Console

from linspec.bench.report import add_output_arguments, output_dir, results_folder
from linspec.errors import LinspecError
from linspec.utils.devices import add_placement_arguments, placement
from linspec.utils.progress import progress_bar, show_item
from linspec.utils.results import markdown_table, record_bench

EXAMPLE = "example: linspec bench speculative --max-new-tokens 64 --repeats 2 --sample-repeats 4"

PASSAGE = (
    "The lighthouse on the northern cape was built in 1871 from granite quarried two miles inland. Its lamp "
    "burned whale oil until 1902, then kerosene, and since 1954 it has run on electricity from the village grid. "
    "The keeper's cottage now holds a small museum with the original lens, a logbook of storms, and photographs "
    "of the three families who tended the light for more than eighty years."
)
CODE = (
    "def total_price(items, tax):\n"
    "    total = 0\n"
    "    for item in items:\n"
    "        total += item.price * item.quantity\n"
    "    return total * (1 + tax)\n"
)
# (name, grounded?, prompt): grounded prompts ask for text that is largely in the prompt.
PROMPTS = [
    ("quote", True, f"Repeat the following passage word for word.\n\n{PASSAGE}"),
    (
        "code-edit",
        True,
        f"Rename the variable total to subtotal in this function and show the whole function.\n\n{CODE}",
    ),
    ("summary", True, f"Summarise this passage in two sentences, reusing its wording.\n\n{PASSAGE}"),
    ("open", False, "Write a short story about a robot who learns to paint."),
    ("explain", False, "Explain how a refrigerator keeps food cold, for a curious ten-year-old."),
    ("list", False, "List five tips for keeping a houseplant healthy, one line each."),
    (
        "follow-up",
        False,
        "Earlier you told me that bees make honey from nectar. Follow-up question: why do bees "
        "need to store so much honey, and what happens to a hive in winter?",
    ),
]


@dataclass
class Setting:
    name: str
    mode: str  # "greedy" or "t=1"
    kind: str  # "plain-hf", "linspec", "hf-assisted"
    drafter: dict = field(default_factory=dict)  # "kind" and its registry settings, or HF generate() arguments
    slow: bool = False  # run only on the first and the last prompt


def settings_for(target_name: str, exit_layer: int, trained: dict | None = None) -> list[Setting]:
    """The rows for one target; ``trained``: ``{kind: depth}`` of the trained drafters made for it."""
    other = "converted" if target_name == "original" else "original"
    learned = []
    for kind, depth in (trained or {}).items():
        learned += [
            Setting(f"{kind} chain k={depth}", "greedy", "linspec", {"kind": kind, "num_draft_tokens": depth}),
            Setting(f"{kind} tree k={depth} x3", "greedy", "linspec",
                    {"kind": kind, "num_draft_tokens": depth, "tree_width": 3}),
            Setting(
                f"{kind} chain k={depth} conf>=0.5",
                "greedy",
                "linspec",
                {"kind": kind, "num_draft_tokens": depth, "min_confidence": 0.5},
            ),
            Setting(f"{kind} chain k={depth}", "t=1", "linspec", {"kind": kind, "num_draft_tokens": depth}),
            Setting(f"lookup+{kind} chain k={depth}", "greedy", "linspec",
                    {"kind": kind, "num_draft_tokens": depth, "lookup_first": True}),
            Setting(f"lookup+{kind} chain k={depth} conf>=0.5", "greedy", "linspec",
                    {"kind": kind, "num_draft_tokens": depth, "min_confidence": 0.5, "lookup_first": True}),
            Setting(f"lookup+{kind} chain k={depth}", "t=1", "linspec",
                    {"kind": kind, "num_draft_tokens": depth, "lookup_first": True}),
        ]  # fmt: skip
    rows = [
        Setting("plain generate()", "greedy", "plain-hf"),
        Setting("plain, linspec loop", "greedy", "linspec", {"kind": "none"}),
        Setting("lookup chain k=10", "greedy", "linspec", {"kind": "lookup", "num_draft_tokens": 10}),
        Setting("lookup tree k=10 x3", "greedy", "linspec",
                {"kind": "lookup", "num_draft_tokens": 10, "tree_width": 3}),
        Setting(f"early exit L{exit_layer} chain k=3", "greedy", "linspec",
                {"kind": "early-exit", "exit_layer": exit_layer, "num_draft_tokens": 3}, slow=True),
        Setting(f"early exit L{exit_layer} tree k=3 x2", "greedy", "linspec",
                {"kind": "early-exit", "exit_layer": exit_layer, "num_draft_tokens": 3, "tree_width": 2}, slow=True),
        Setting(f"{other} model drafts chain k=3", "greedy", "linspec",
                {"kind": "model", "draft_model": other, "num_draft_tokens": 3}, slow=True),
        Setting("HF assisted: prompt lookup k=10", "greedy", "hf-assisted", {"prompt_lookup_num_tokens": 10}),
        Setting(f"HF assisted: early exit L{exit_layer}", "greedy", "hf-assisted",
                {"assistant_early_exit": exit_layer}, slow=True),
        Setting(f"HF assisted: {other} model", "greedy", "hf-assisted", {"assistant_model": other}, slow=True),
        Setting("plain generate(), sampling", "t=1", "plain-hf"),
        Setting("lookup chain k=10", "t=1", "linspec", {"kind": "lookup", "num_draft_tokens": 10}),
        Setting("lookup tree k=10 x3", "t=1", "linspec", {"kind": "lookup", "num_draft_tokens": 10, "tree_width": 3}),
        Setting("HF assisted: prompt lookup k=10", "t=1", "hf-assisted", {"prompt_lookup_num_tokens": 10}),
    ]  # fmt: skip
    return rows[:4] + [r for r in learned if r.mode == "greedy"] + rows[4:] + [r for r in learned if r.mode != "greedy"]


@dataclass
class Run:
    target: str
    prompt: str
    mode: str
    setting: str
    new_tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0  # greedy: the fastest run; sampled: the mean over seeds
    samples: list[float] = field(default_factory=list)  # tokens/s of each run
    speedup: float | None = None
    tokens_per_call: float | None = None
    acceptance_by_depth: list[float] | None = None
    ms_per_round: dict | None = None  # draft / verify (forward, acceptance) / commit, milliseconds per round
    identical_to_plain: bool | None = None
    error: str | None = None
    text: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="the original model (default: smollm2-135m)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generation (default 64)")
    parser.add_argument("--repeats", type=int, default=2, help="greedy runs per setting; the fastest counts")
    parser.add_argument("--sample-repeats", type=int, default=4, help="sampled runs (seeds) per setting; mean counts")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--exit-layer", type=int, default=24, help="early-exit layer (default 24 of 30)")
    parser.add_argument("--prompts", nargs="+", choices=[p[0] for p in PROMPTS], help="subset of the prompts")
    parser.add_argument(
        "--drafters", nargs="+", default=[], metavar="DIR",
        help="trained drafter directories (linspec train <kind>-smollm2-135m); each runs on the target it was "
        "trained for",
    )  # fmt: skip
    parser.add_argument("--targets", nargs="+", choices=["original", "converted"], default=["original", "converted"])
    parser.add_argument(
        "--only", nargs="+", metavar="TEXT",
        help="run only the settings whose name contains one of these (the plain generate() baselines always run)",
    )  # fmt: skip
    parser.add_argument(
        "--converted",
        help="linspec model dir for the converted target, e.g. a trained runs/smollm2-135m-demo/model "
        "(default: the raw paper-preset conversion of --model)",
    )
    add_placement_arguments(parser)
    add_output_arguments(parser)


def settings_summary(model_dir: str) -> str:
    """The conversion settings a speed table must state: global memory, softmax layers kept, group and taps."""
    import json
    from pathlib import Path

    try:
        settings = json.loads((Path(model_dir) / "config.json").read_text())["linspec"]
    except (OSError, ValueError, KeyError, TypeError):
        return "settings unknown"
    memory = (
        "paper memory"
        if not settings.get("global_decay") and settings.get("global_norm", "none") == "none"
        else (f"decay={settings.get('global_decay', False)}, norm={settings.get('global_norm', 'none')}")
    )
    if settings.get("local_kernel") == "softmax":
        sinks = f"{settings.get('sink_tokens')} {settings.get('sink_positions', 'absolute')} sinks"
        memory = f"softmax window {settings.get('local_window')} + {sinks}, {memory}"
    layers = settings.get("softmax_layers") or []
    kept = f"{len(layers)} softmax layers {layers}" if layers else "all-linear"
    return f"{memory}, {kept}, G={settings.get('group_size')}, P={settings.get('conv_taps')}"


def run(args: argparse.Namespace) -> int:
    import linspec
    from linspec.sources.loading import load_source

    checks = {"max_new_tokens": (1, 4096), "repeats": (1, 100), "sample_repeats": (0, 100), "threads": (1, 1024),
              "exit_layer": (1, 4096)}  # fmt: skip
    for name, (low, high) in checks.items():
        if not low <= getattr(args, name) <= high:
            raise LinspecError(f"--{name.replace('_', '-')} must be in {low}..{high}, got {getattr(args, name)}")
    from linspec.drafting.store import read_config

    for path in args.drafters:  # a missing or damaged drafter is refused before any model loads
        read_config(path)
    out_dir = output_dir(args, "speculative")
    device, dtype = placement(args.device, args.dtype)
    console = Console()
    torch.set_num_threads(args.threads)
    original, tokenizer = load_source(args.model, progress=False, dtype=dtype, device=device)
    if args.converted:
        converted, _ = load_source(args.converted, progress=False, dtype=dtype, device=device)
        if not hasattr(converted, "linspec_modules"):
            raise LinspecError(f"--converted {args.converted} is not a linspec model; convert or train one first")
        vocab, theirs = original.config.vocab_size, converted.config.vocab_size
        if vocab != theirs:
            raise LinspecError(
                f"--converted {args.converted} has {theirs} tokens where --model {args.model} has {vocab}: it is "
                "not a conversion of --model (the prompts are encoded with --model's tokenizer)"
            )
    else:
        converted = linspec.convert(
            load_source(args.model, progress=False, dtype=dtype, device=device)[0], linspec.LinspecConfig()
        )
    if tokenizer is None:
        raise LinspecError(f"--model {args.model} has no tokenizer; the benchmark's prompts need one")
    models = {"original": original.eval(), "converted": converted.eval()}
    trained = _trained_drafters(args.drafters, models, tokenizer)
    prompts = [p for p in PROMPTS if not args.prompts or p[0] in args.prompts]
    runs: list[Run] = []
    bar = progress_bar(len(args.targets) * len(prompts), "speculative benchmark", unit="prompt")
    for target_name in args.targets:
        for index, (prompt_name, _, prompt) in enumerate(prompts):
            show_item(bar, f"{target_name}: {prompt_name}")
            edge = index in (0, len(prompts) - 1)
            mine = {kind: module.max_depth for (name, kind), module in trained.items() if name == target_name}
            block = [
                s
                for s in settings_for(target_name, args.exit_layer, mine)
                if (edge or not s.slow) and _wanted(s, args.only) and (s.mode == "greedy" or args.sample_repeats)
            ]  # --sample-repeats 0: no sampled rows
            results = [Run(target_name, prompt_name, s.mode, s.name) for s in block]
            for repeat in range(max(args.repeats, args.sample_repeats)):  # interleaved: the same spread of load
                for setting, result in zip(block, results, strict=True):
                    runs_wanted = args.repeats if setting.mode == "greedy" else args.sample_repeats
                    if not result.error and repeat < runs_wanted:
                        _measure(models, target_name, tokenizer, prompt, setting, repeat, args, result, trained)
            bar.update()
            for setting, result in zip(block, results, strict=True):
                runs.append(result)
                bar.write(
                    f"{target_name:9s} {prompt_name:9s} {setting.mode:6s} {setting.name:38s} "
                    + (f"error: {result.error}" if result.error else f"{result.tokens_per_s:6.2f} tok/s")
                )
    bar.close()
    _add_speedups(runs)
    section, figure = _report(runs, args, prompts)
    options = {k: v for k, v in vars(args).items() if k not in ("func", "out", "update_docs", "no_record")}
    data = {"settings": options | {"prompts": [p[0] for p in prompts]}, "runs": [asdict(r) for r in runs]}
    console.print(section)
    if out_dir is not None:
        console.print(f"wrote {record_bench('speculative', data, section, figure, results_folder(args, out_dir))}")
    return 0


def _wanted(setting: Setting, only: list[str] | None) -> bool:
    """``--only``: settings named by one of the texts, and always the plain baselines the ratios divide by."""
    return setting.kind == "plain-hf" or not only or any(text in setting.name for text in only)


def _trained_drafters(paths: list[str], models: dict, tokenizer) -> dict:
    """``{(target name, kind): module}``: each drafter bound to the target it was trained for (others skipped)."""
    from linspec.drafting import load_drafter

    found = {}
    for path in paths:
        for name, model in models.items():
            try:
                module = load_drafter(path, model, tokenizer)
            except LinspecError as error:
                if "trained for another target" in str(error):
                    continue
                raise
            found[(name, module.kind)] = module
    return found


def _measure(models, target_name: str, tokenizer, prompt: str, setting: Setting, repeat: int, args, result: Run,
             trained: dict | None = None):  # fmt: skip
    """One generation; ``result`` keeps the fastest run (tokens/s) of this setting, or the error."""
    from linspec.data.prompts import encode_prompts
    from linspec.drafting.registry import drafter_spec, needs_trained_drafter
    from linspec.errors import LinspecError
    from linspec.speculative.generate import speculative_generate

    target = models[target_name]
    input_ids, mask = encode_prompts(tokenizer, [prompt])
    sample = setting.mode != "greedy"
    common = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    stats = None
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            if setting.kind == "linspec":
                options = dict(setting.drafter)
                kind = options.pop("kind")
                if "draft_model" in options:  # the other target, already loaded
                    options["draft_model"] = models[options["draft_model"]]
                if needs_trained_drafter(kind):  # the module loaded for this target
                    options["drafter"] = (trained or {}).get((target_name, kind))
                drafter = drafter_spec(kind, **options).build(target, tokenizer)
                out = speculative_generate(
                    target, drafter, input_ids, attention_mask=mask, do_sample=sample,
                    generator=torch.Generator(device=models[target_name].device).manual_seed(repeat),
                    eos_token_id=target.generation_config.eos_token_id, **common,
                )  # fmt: skip
                sequences, stats = out.sequences, out.stats
            else:
                extra = dict(setting.drafter)
                if "assistant_model" in extra:
                    extra["assistant_model"] = models[extra["assistant_model"]]
                torch.manual_seed(repeat)
                sequences = target.generate(input_ids, attention_mask=mask, do_sample=sample, **extra, **common)
    except (LinspecError, ValueError, RuntimeError) as error:
        result.error = str(error).splitlines()[0][:160]
        return
    seconds = time.perf_counter() - start
    new = sequences[0, input_ids.shape[1] :]
    new = new[new != tokenizer.pad_token_id] if tokenizer.pad_token_id is not None else new
    speed = new.numel() / seconds
    result.samples.append(speed)
    if stats is not None:
        calls = (result.tokens_per_call or 0.0) * (len(result.samples) - 1) + stats.tokens_per_call
        result.tokens_per_call = calls / len(result.samples)  # mean over runs (the same every greedy run)
    if sample:
        result.text = result.text or tokenizer.decode(new, skip_special_tokens=True)[:200]
        result.tokens_per_s = statistics.mean(result.samples)
        result.new_tokens += int(new.numel())
        result.seconds += seconds
        return
    if speed <= result.tokens_per_s:
        return
    result.new_tokens, result.seconds, result.tokens_per_s = int(new.numel()), seconds, speed
    result.text = tokenizer.decode(new, skip_special_tokens=True)[:200]
    if stats is not None:
        result.acceptance_by_depth = [round(a, 3) for a in stats.acceptance_by_depth]
        rounds = max(stats.target_calls, 1)
        result.ms_per_round = {
            "draft": round(1000 * stats.draft_seconds / rounds, 2),
            "verify": round(1000 * (stats.verify_seconds - stats.commit_seconds) / rounds, 2),
            "commit": round(1000 * stats.commit_seconds / rounds, 2),
        }
    result._tokens = new.tolist()  # compared with plain greedy in _add_speedups


def _add_speedups(runs: list[Run]) -> None:
    baseline = {(r.target, r.prompt, r.mode): r for r in runs if r.setting.startswith("plain generate()")}
    for r in runs:
        base = baseline.get((r.target, r.prompt, r.mode))
        if r.error or base is None or base.error:
            continue
        r.speedup = r.tokens_per_s / base.tokens_per_s
        if r.mode == "greedy" and r is not base:
            r.identical_to_plain = getattr(r, "_tokens", None) == getattr(base, "_tokens", None)


def _cost_split(runs: list[Run]) -> str:
    """Median milliseconds per round spent drafting, verifying (forward and acceptance) and committing."""
    splits = [r.ms_per_round for r in runs if r.ms_per_round]
    if not splits:
        return "-"
    return "/".join(f"{statistics.median(s[part] for s in splits):.0f}" for part in ("draft", "verify", "commit"))


def _report(runs: list[Run], args, prompts) -> tuple[str, object]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p[0] for p in prompts]
    grounded = {p[0] for p in prompts if p[1]}
    keys = list(dict.fromkeys((r.target, r.mode, r.setting) for r in runs))
    rows = []
    for target, mode, setting in keys:
        mine = [r for r in runs if (r.target, r.mode, r.setting) == (target, mode, setting)]
        by_prompt = {r.prompt: r for r in mine}
        cells = []
        for name in names:
            r = by_prompt.get(name)
            cells.append("" if r is None else ("n/a" if r.error else f"{r.speedup:.2f}x" if r.speedup else "-"))
        speedups = [r.speedup for r in mine if r.speedup and r.prompt in grounded]
        every = [r.speedup for r in mine if r.speedup]
        calls = [r.tokens_per_call for r in mine if r.tokens_per_call]
        errors = [r.error for r in mine if r.error]
        exact = [r.identical_to_plain for r in mine if r.identical_to_plain is not None]
        rows.append([
            target, mode, setting, *cells,
            f"{statistics.median(speedups):.2f}x" if speedups else "-",
            f"{statistics.median(every):.2f}x" if len(every) == len(names) else "-",
            f"{statistics.geometric_mean(every):.2f}x" if len(every) == len(names) else "-",
            f"{statistics.mean(calls):.2f}" if calls else "-",
            ("yes" if all(exact) else f"{sum(exact)}/{len(exact)}") if exact else "-",
            _cost_split(mine),
            f"{statistics.median([r.tokens_per_s for r in mine if not r.error]):.2f}" if not errors else errors[0][:60],
        ])  # fmt: skip
    headers = [
        "target", "mode", "setting", *names, "median (grounded)", "median (all)", "geomean (all)", "tokens/call",
        "same tokens", "ms/round draft/verify/commit", "tok/s or error",
    ]  # fmt: skip
    machine = f"{torch.get_num_threads()} thread(s)"
    device, dtype = placement(args.device, args.dtype)
    where = f"{device.type.upper()}, {str(dtype).removeprefix('torch.')}"
    section = "\n".join([
        "## Speculative decoding (`linspec bench speculative`)",
        "",
        f"Command: `linspec bench speculative --max-new-tokens {args.max_new_tokens} --repeats {args.repeats} "
        f"--sample-repeats {args.sample_repeats} "
        + (f"--converted {args.converted} " if args.converted else "")
        + (f"--targets {' '.join(args.targets)} " if args.targets else "")
        + (f"--prompts {' '.join(args.prompts)} " if args.prompts else "")
        + (f"--drafters {' '.join(map(str, args.drafters))} " if args.drafters else "")
        + (f"--only {' '.join(args.only)} " if args.only else "")
        + (f"--device {args.device} " if args.device != "auto" else "")
        + (f"--dtype {args.dtype} " if args.dtype != "auto" else "")
        + f"--threads {args.threads} --exit-layer {args.exit_layer}`. {where}, batch 1, {machine}, on a "
        "machine shared with other jobs (absolute tokens/s are noisy; ratios are taken within one prompt block).",
        "",
        "Speedup = end-to-end tokens/s (prefill included, stop at EOS or the budget) over plain `generate()` of "
        "the same target in the same mode. Prompts: "
        + "; ".join(f"**{p[0]}** ({'grounded' if p[1] else 'open-ended'})" for p in prompts)
        + " — the full texts are in `linspec/bench/speculative.py`. *median (grounded)* covers the grounded "
        "prompts; *median (all)* and the geometric mean cover every prompt (rows that ran on all of them). Trained "
        "drafters (`--drafters`) run on the target they were trained for; *ms/round* splits a round into drafting, "
        "verification (the target's forward and acceptance) and the commit. Repeats are interleaved (every "
        "setting of a prompt, then again). Greedy rows: the fastest run counts. Sampled (t=1) rows: the mean over "
        f"{args.sample_repeats} seeds, because their speed depends mostly on which text was drawn (a sample that "
        "copies the passage is fast, one that paraphrases is not). "
        + (
            f"*converted* is `{args.converted}` (a trained linspec model; {settings_summary(args.converted)}). "
            if args.converted
            else "*converted* is the raw, untrained paper-preset conversion (γ = conv = 0, perplexity ~10⁴): its "
            "text is noise that prompt lookup rarely matches, so its rows measure what the machinery costs on a "
            "linear target, not a useful speedup. "
        )
        + "Slow "
        "drafters (early exit, model drafts) ran on the first and last prompt only. HF assisted generation cannot "
        "run with a linspec target or assistant (it crops caches; linear states cannot be cropped): n/a.",
        "",
        markdown_table(headers, rows),
    ])  # fmt: skip

    figure, axes = plt.subplots(1, len(args.targets), figsize=(7 * len(args.targets), 5), squeeze=False)
    for ax, target in zip(axes[0], args.targets, strict=True):
        labels, values = [], []
        for t, mode, setting in keys:
            mine = [r.speedup for r in runs if (r.target, r.mode, r.setting) == (t, mode, setting)
                    and r.speedup and r.prompt in grounded]  # fmt: skip
            if t == target and mine and not setting.startswith("plain generate()"):
                labels.append(f"{setting} ({mode})")
                values.append(statistics.median(mine))
        ax.barh(labels[::-1], values[::-1], color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=1)
        ax.axvline(2.0, color="tab:red", linewidth=1, linestyle="--")
        ax.set_title(f"{target}: speedup over plain generate() (grounded prompts, median)")
        ax.set_xlabel("× plain decoding tokens/s")
    figure.tight_layout()
    return section, figure
