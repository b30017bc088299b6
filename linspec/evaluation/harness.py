"""An lm-evaluation-harness model over any model linspec loads: ``lm_eval`` tasks for linspec models.

Importing this module registers the model name ``linspec`` with the harness (it needs ``pip install
'linspec[eval]'``; ``linspec eval harness`` says so in one line when it is missing). The harness's ``lm_eval``
command has no plugin mechanism and does not import linspec, so linspec installs the harness CLI with the model
registered as ``linspec-lm-eval`` (``linspec.evaluation.harness_command`` says why)::

    linspec-lm-eval run --model linspec --model_args pretrained=DIR --tasks T --include_path D
    python -m linspec.evaluation.harness run --model linspec ...      # the same

A saved linspec model also runs in the plain ``lm_eval`` command through the remote code its directory carries:
``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True``. In Python:
``import linspec.evaluation.harness`` and then ``lm_eval.simple_evaluate(model="linspec", model_args={"pretrained":
DIR}, ...)``.

Scoring runs one request at a time, chunk-wise through the model's cache (``linspec.evaluation.perplexity``), so long
contexts stay within memory on a CPU; generation is greedy (``linspec.evaluation.greedy``). ``batch_size`` is
accepted and ignored.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from tqdm.auto import tqdm

from linspec.data.prompts import render_chat
from linspec.errors import LinspecError

NAME = "linspec"


class LinspecLM(TemplateLM):
    """``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` for a linspec (or any causal) model.

    ``pretrained`` is what ``linspec.sources.loading.load_source`` takes: a model directory, a ``.gguf`` file, a hub id
    or a demo name; or pass a loaded ``model`` and ``tokenizer``. ``max_length`` (default: the model's
    positions) bounds scored windows and prompts; ``chunk`` is the prefill chunk in tokens."""

    def __init__(
        self,
        pretrained: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        dtype: str | torch.dtype = "float32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        chunk: int = 512,
        device: str | None = None,
        batch_size: Any = None,
        max_batch_size: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise LinspecError("the linspec harness model needs pretrained=PATH (or model= and tokenizer=)")
            from linspec.sources.loading import load_source
            from linspec.utils.devices import resolve_dtype

            model, tokenizer = load_source(str(pretrained), dtype=resolve_dtype(dtype, torch.device("cpu")))
        if tokenizer is None:
            raise LinspecError(f"{pretrained or 'the model'} has no tokenizer; the harness needs one")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # The harness CLI passes device=cuda unless told otherwise; like its own hf model, run on the CPU.
            warnings.warn(f"device {device!r} is not available; evaluating on the CPU", stacklevel=2)
            device = "cpu"
        self.model = model.to(device).eval() if device else model.eval()
        self.tokenizer = tokenizer
        self.pretrained = str(pretrained or getattr(model, "name_or_path", "model"))
        positions = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or positions)
        self.max_gen_toks, self.chunk = int(max_gen_toks), int(chunk)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", self.pretrained).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), continuation is the greedy one)`` per request; a request longer
        than ``max_length`` tokens keeps its last ``max_length``."""
        from linspec.evaluation.perplexity import next_token_scores

        results = []
        for strings, context, continuation in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            whole = torch.tensor((context + continuation)[-self.max_length :])
            logprobs, greedy = next_token_scores(self.model, whole, self.chunk)
            n = len(continuation)
            results.append((float(logprobs[-n:].sum()), bool(greedy[-n:].all())))
            self.cache_hook.add_partial("loglikelihood", strings, results[-1])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents (every token, the first predicted from ``prefix_token_id``), in
        windows of ``max_length`` tokens as ``linspec.evaluation.perplexity.scoring_windows`` lays them out."""
        from linspec.evaluation.perplexity import next_token_scores, scoring_windows

        results = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            ids = torch.tensor([self.prefix_token_id, *self.tok_encode(request.args[0])])
            total = 0.0
            for window, skip in scoring_windows(ids, self.max_length, self.max_length):
                logprobs, _ = next_token_scores(self.model, window, self.chunk)
                total += float(logprobs[max(skip - 1, 0) :].sum())
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations cut at the first ``until`` string (sampling is refused, not silently ignored)."""
        from linspec.evaluation.greedy import greedy_generate, stop_ids

        stop = stop_ids(self.tokenizer, self.model)
        results = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, options = request.args
            options = dict(options or {})
            if options.get("do_sample") and float(options.get("temperature", 1.0)) > 0:
                raise LinspecError("the linspec harness model decodes greedily; set do_sample: false")
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(options.get("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context, add_special_tokens=None)[-(self.max_length - budget) :]

            def reached(tokens: list[int], until: list[str] = until) -> bool:
                text = self.tok_decode(tokens)
                return any(marker in text for marker in until)

            tokens = greedy_generate(self.model, prompt, budget, stop, self.chunk, should_stop=reached)
            text = self.tok_decode([t for t in tokens if t not in stop])
            for marker in until:
                text = text.split(marker)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, options), text)
        return results


def register() -> None:
    """Register ``LinspecLM`` as ``--model linspec`` (idempotent). The harness fills its built-in (lazy) model
    table only when the registry is empty, so that table is loaded first or ``--model hf`` would vanish."""
    import lm_eval.models  # noqa: F401

    if NAME not in model_registry:  # by import path: ``python -m`` runs this file as a second module, __main__
        model_registry.register(NAME, target=f"{__spec__.name}:LinspecLM")


register()


def run_tasks(
    model: str,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    **model_args: Any,
) -> dict:
    """Run harness ``tasks`` (names or YAML task files under ``include_path``) on a linspec-loadable model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" under {include_path}" if include_path else ""
        raise LinspecError(f"unknown harness task(s) {', '.join(unknown)}{where}")
    results = lm_eval.simple_evaluate(
        model=LinspecLM(pretrained=model, **model_args),
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template,
        log_samples=False,
    )
    if results is None:
        raise LinspecError("the harness returned no results")
    return results


def main() -> None:
    """``python -m linspec.evaluation.harness ...``: the harness CLI, with ``--model linspec`` registered by
    importing this module. (``linspec-lm-eval`` is ``linspec.evaluation.harness_command``, which imports this
    module only once it knows the harness is installed.)"""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
