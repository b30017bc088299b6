"""``linspec-lm-eval``: lm-evaluation-harness's own command line, with ``--model linspec`` registered.

The harness finds models only in its registry, filled from its own ``lm_eval.models`` table: it has no plugin
mechanism (no entry-point group, no option to import a module; EleutherAI/lm-evaluation-harness#3282 asks for
one), so its ``lm_eval`` command cannot know a model another package defines. A startup hook (a ``.pth`` file run
by every Python process of the environment) could register one, but would import linspec into every process and
cannot ship in a wheel. So linspec installs this command: the harness's own CLI, every subcommand and flag
unchanged, with ``linspec`` registered first. ``python -m linspec.evaluation.harness`` is the same.

Models a linspec process saved also load in the plain ``lm_eval`` command through their remote code:
``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True``.

This module imports nothing heavy, so a missing harness is one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib.util
import sys

INSTALL_HINT = "lm-evaluation-harness is not installed; pip install 'linspec[eval]'"


def main() -> None:
    """Run the harness CLI (``sys.argv``) with ``--model linspec`` registered."""
    if importlib.util.find_spec("lm_eval") is None:
        print(f"linspec-lm-eval: {INSTALL_HINT}", file=sys.stderr)
        raise SystemExit(2)
    from lm_eval.__main__ import cli_evaluate

    import linspec.evaluation.harness  # noqa: F401  (registers the model)

    cli_evaluate()


if __name__ == "__main__":
    main()
