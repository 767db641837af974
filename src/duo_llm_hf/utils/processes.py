"""Which process of a launch this is, also for several processes on CPU.

accelerate 1.x's `accelerate launch` starts several CPU processes only through mpirun; without it, CPU runs are
launched with torchrun and `ACCELERATE_USE_CPU=1`::

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 eval/oracle_study.py ...

``Accelerator()` reads that variable, but a bare `PartialState()` does not: on a machine without GPUs it would
see one process in each of the launched ones, and every process would do (and write) all the work.

What a command prints (`quiet_libraries`, called by every command before it runs): only the main process prints,
and the libraries' own progress bars (datasets' ``Filter`` and ``Map``, transformers' ``Loading weights`` and
``Writing model shards``, Hub downloads) are off, so a command shows one bar per stage of its own. Set
``HF_DATASETS_DISABLE_PROGRESS_BARS=0`` and/or ``HF_HUB_DISABLE_PROGRESS_BARS=0`` (transformers follows the Hub's)
to see them again.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# The libraries' own switches of their progress bars; set to a false value by the user, they stay on.
LIBRARY_PROGRESS_ENV = ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")
# Where launchers put the process's rank: torchrun and accelerate launch, Open MPI, MPICH / Intel MPI.
RANK_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def process_state():
    """Accelerate's `PartialState` of this launch: one process, GPUs, or several CPU processes under torchrun."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def is_main_process() -> bool:
    """Whether this is the main process (rank 0) of a launch, or the only process; read from the launcher's
    environment, so it can be asked before torch or accelerate are imported."""
    for name in RANK_ENV:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip() == "0"
    return True


def quiet_libraries() -> None:
    """Turn off the libraries' progress bars unless the user asked for them (`LIBRARY_PROGRESS_ENV` set to a false
    value) and, in a process other than the main one, every bar and every warning: only the main process prints.

    Sets the environment variables the libraries read when imported, and calls their switches where they are
    imported already (where the user set a variable to a false value before such an import, the library keeps it:
    call this before importing them, as ``duo-llm`` does).
    """
    main = is_main_process()
    if not main:
        warnings.simplefilter("ignore")
    for name in LIBRARY_PROGRESS_ENV:
        asked = os.environ.get(name, "").strip().lower() in ("0", "false", "no", "off")
        if not (main and asked):
            os.environ[name] = "1"
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if main:
        return
    os.environ["TRANSFORMERS_VERBOSITY"] = os.environ["DATASETS_VERBOSITY"] = "error"
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.set_verbosity_error()
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.logging.set_verbosity_error()
    logging.getLogger("duo_llm_hf").setLevel(logging.ERROR)
