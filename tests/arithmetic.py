"""Which machine computed a stored tensor, and the comparison that follows from it.

Golden files and the fixtures of earlier releases pin numbers bit for bit, but only a machine that rounds as the
writer's did can reproduce them: MKL and oneDNN choose kernels by CPU model, not only by vector width, so two
AVX512 machines of different generations can differ in the last bits of a float64 matmul and, after a few
optimiser steps, in the fifth digit of a small float32 loss. Bit-identity is asserted where the fingerprint
matches the writer's; elsewhere agreement within a tolerance that such rounding stays inside.
"""

from __future__ import annotations

from pathlib import Path

import torch


def machine() -> str:
    """torch build, the vector unit it dispatches to, and the CPU model (vendor, family, model number)."""
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {_cpu_model()}"


def _cpu_model() -> str:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "cpu unknown"
    return f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def assert_reproduced(actual: torch.Tensor, expected: torch.Tensor, written_on: str | None, *, rtol: float,
                      atol: float, name: str) -> None:  # fmt: skip
    """Bit-identical on the writer's machine; within ``rtol``/``atol`` on any other (or an unrecorded one)."""
    if written_on == machine():
        assert torch.equal(actual, expected), f"{name}: not bit-identical to what this machine's kind wrote"
    else:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=name)
