"""One place that quiets the libraries under the ``linspec`` command.

Users read linspec's own lines and progress bars; what the libraries print besides (``datasets``' "Generating train
split" bar for a local file, transformers' FutureWarnings and advisory notes, matplotlib's complaint when a loss
curve reaches 0 on a log axis, git's "fatal: not a git repository" when lm-eval looks up a commit hash) says
nothing about the user's run. Only environment variables and warning filters are set here, before any of those
libraries is imported, so the command stays fast; library code (``linspec`` used from Python) is not affected.
"""

from __future__ import annotations

import os
import warnings

# Read by the libraries when they are first imported; a value the user set wins.
QUIET_ENVIRONMENT = {
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets: "Generating train split" and the like
    "TRANSFORMERS_VERBOSITY": "error",  # transformers' logger: warnings and advisories
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers' "the current process just got forked" warning
}


def quiet_libraries() -> None:
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside libraries, not the user's doing
    warnings.filterwarnings("ignore", message="Data has no positive values", category=UserWarning)  # matplotlib log


def quiet_git_lookups() -> None:
    """lm-eval stamps results with ``git describe`` run in the working directory; outside a repository git prints
    "fatal: not a git repository" on the shared stderr. Point its lookup at a git that stays silent."""
    import subprocess

    import lm_eval.evaluator

    def commit_hash() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
        except OSError:  # no git
            return None
        return (done.stdout.strip() or None) if done.returncode == 0 else None

    lm_eval.evaluator.get_git_commit_hash = commit_hash
