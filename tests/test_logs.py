"""Console logging as a TRL / accelerate user expects it: moon-rl's progress at INFO as plain lines on the main process,
WARNING for warnings, -v for moon-rl's debug lines only, other libraries left at their own levels."""

from __future__ import annotations

import logging

import pytest

from moon_rl.logs import NOISY_IMPORT_LOGGERS, setup_logging


@pytest.fixture
def restore_logging():
    """Call the yielded function instead of `setup_logging`: it runs on a bare root logger, as in a fresh `moon-rl`
    process (pytest adds its own handlers to the root for each test phase); everything is restored afterwards."""
    moon, root = logging.getLogger("moon_rl"), logging.getLogger()
    saved = (list(moon.handlers), moon.level, list(root.handlers), root.level)
    noisy = {name: logging.getLogger(name).level for name in NOISY_IMPORT_LOGGERS}

    def setup(verbose: bool = False) -> None:
        root.handlers = []
        setup_logging(verbose=verbose)

    yield setup
    moon.handlers, moon.level = saved[0], saved[1]
    root.handlers, root.level = saved[2], saved[3]
    for name, level in noisy.items():
        logging.getLogger(name).setLevel(level)


def emit() -> None:
    log = logging.getLogger("moon_rl.run")
    log.debug("debug detail")
    log.info("[1/5] data: starting")
    log.warning("no trained model at x")
    log.error("broken")


def test_progress_is_plain_info_and_warnings_keep_their_level(restore_logging, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    from transformers.utils import logging as hf_logging

    transformers_level = hf_logging.get_verbosity()  # transformers sets its own level on import
    restore_logging()
    emit()
    logging.getLogger("some_library").warning("library warning")
    # bitsandbytes' import-time kernel lookup, on every command: not a warning about the run.
    logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'kernels-community/...'")
    err = capsys.readouterr().err.splitlines()
    # Each once: moon-rl's records propagate, but the root handler leaves them to moon-rl's own.
    assert err == ["[1/5] data: starting", "WARNING moon_rl.run: no trained model at x", "ERROR moon_rl.run: broken",
                   "WARNING some_library: library warning"]
    assert hf_logging.get_verbosity() == transformers_level  # -v or not, not ours to change


def test_verbose_adds_moon_rls_debug_lines_only(restore_logging, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    restore_logging(verbose=True)
    emit()
    logging.getLogger("some_library").info("library chatter")
    err = capsys.readouterr().err
    assert "DEBUG moon_rl.run: debug detail" in err and "library chatter" not in err


def test_other_processes_report_errors_only(restore_logging, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    restore_logging(verbose=True)
    emit()
    assert capsys.readouterr().err.splitlines() == ["ERROR moon_rl.run: broken"]
