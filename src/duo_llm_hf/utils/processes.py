"""Which process of a launch this is, also for several processes on CPU.

accelerate 1.x's `accelerate launch` starts several CPU processes only through mpirun; without it, CPU runs are
launched with torchrun and `ACCELERATE_USE_CPU=1`::

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 eval/oracle_study.py ...

`Accelerator()` reads that variable, but a bare `PartialState()` does not: on a machine without GPUs it would
see one process in each of the launched ones, and every process would do (and write) all the work.
"""

from __future__ import annotations


def process_state():
    """Accelerate's `PartialState` of this launch: one process, GPUs, or several CPU processes under torchrun."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
