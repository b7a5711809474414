"""moon-rl's console logging, as TRL and accelerate users expect it from a training command.

* moon-rl's own logger (`moon_rl.*`) at INFO: the run's progress as plain lines (`[2/5] sft: starting`), warnings
  with their level and module (`WARNING moon_rl.training.sft: ...`), on the main process only (`RANK` 0; the other
  processes of a `torchrun` / `accelerate launch` run show errors alone, so nothing is printed once per GPU);
* `-v`: moon-rl's DEBUG lines too; other libraries keep their own levels (their warnings show as before);
* transformers' per-file "Loading weights" bars stay hidden (noise on small models), Hub download bars do not.

Library modules only call `logging.getLogger(__name__)`; the CLI calls `setup_logging` once.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

__all__ = ["is_main_process", "setup_logging"]


def is_main_process() -> bool:
    """True on the process that reports: global rank 0 (`RANK`, set by torchrun and accelerate before any init)."""
    return int(os.environ.get("RANK", "0")) == 0


class _PlainInfo(logging.Formatter):
    """INFO as the bare message (progress lines); anything else with its level and logger name."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return f"{record.levelname} {record.name}: {super().format(record)}"


#: Library loggers that warn on import about things unrelated to the run (see `setup_logging`).
NOISY_IMPORT_LOGGERS = ("bitsandbytes", "kernels")


def setup_logging(verbose: bool = False) -> None:
    """Configure the `moon_rl` logger (see the module docstring); safe to call again (handlers are replaced)."""
    logger = logging.getLogger("moon_rl")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainInfo("%(message)s"))
    logger.handlers = [handler]
    if not is_main_process():
        logger.setLevel(logging.ERROR)
    else:
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Other libraries: their warnings, formatted as before, their INFO off. moon-rl's records still propagate (to a
    # user's or pytest's handlers), but the root handler set up here leaves them to the handler above.
    root = logging.getLogger()
    if not root.handlers:
        fallback = logging.StreamHandler(sys.stderr)
        fallback.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        fallback.addFilter(lambda record: not record.name.startswith("moon_rl"))
        root.addHandler(fallback)
        root.setLevel(logging.WARNING)
    # Importing bitsandbytes (peft and TRL do, whatever the recipe) warns that an optional kernel package is missing,
    # or, on a CPU with AVX512-BF16, asks the Hub for a 4-bit CPU kernel and warns that it skipped the publisher check
    # (offline) or failed to load it: nothing about the run, on every command. -v shows them.
    for name in NOISY_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    _hide_weight_loading_bars()


def _hide_weight_loading_bars() -> None:
    from transformers.utils import logging as hf_logging

    def hook(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # transformers' own bars (loading / writing weights); Hub downloads use huggingface_hub's and keep theirs.
        return factory(*args, **{**kwargs, "disable": True})

    hf_logging.set_tqdm_hook(hook)
