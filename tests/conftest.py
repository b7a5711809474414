import os

# Tests never touch the network and never report telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_SESSION_CACHE: str | None = None  # the cache this run created (and removes when it ends)


def pytest_configure(config):
    # Builtin models and synthetic catalogues are built into a per-session cache, never the user's.
    global _SESSION_CACHE
    if "MOON_RL_CACHE" not in os.environ:
        import tempfile

        _SESSION_CACHE = os.environ["MOON_RL_CACHE"] = tempfile.mkdtemp(prefix="moon-rl-test-cache-")


def pytest_unconfigure(config):
    # A cache the caller named (MOON_RL_CACHE set) is theirs to keep; the one this run made goes with it.
    if _SESSION_CACHE is not None:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
