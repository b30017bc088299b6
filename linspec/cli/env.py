"""``linspec env``: versions, device and whether the installed run-time set is the tested one — for bug reports."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "env",
        help="print versions, the device, and whether the run-time dependencies are the tested (locked) set",
        description="Prints linspec's version, python, torch, transformers, peft, accelerate, datasets, triton, fla "
        "and the other libraries linspec uses, the device, and whether linspec's run-time dependencies (what a "
        "plain install pulls in) are installed at exactly the locked versions the test suite passed with "
        "(linspec/constraints-cpu.txt). The test, lint and evaluation tools of the dev and eval extras are "
        "reported on their own line, and where each op of the default preset runs on this device (Triton "
        "kernels or PyTorch, and why). Paste it into bug reports. Exit status 0 either way.",
        epilog="example: linspec env --json > env.json",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of aligned lines")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from linspec.config import DEFAULT_PRESET, LinspecConfig
    from linspec.ops.backend import plan
    from linspec.utils.environment import environment_report

    report = environment_report()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for route in plan(LinspecConfig.from_preset(DEFAULT_PRESET), device):
        report[f"{route.op} ({DEFAULT_PRESET}, {device})"] = f"{route.backend}: {route.reason}"
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(label) for label in report)
        for label, value in report.items():
            print(f"{label:<{width}}  {value}")
    return 0
