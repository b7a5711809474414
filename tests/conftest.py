import os

# Tests never touch the network and never report telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # Builtin models and synthetic catalogues are built into a per-session cache, never the user's.
    if "MOON_RL_CACHE" not in os.environ:
        import tempfile

        os.environ["MOON_RL_CACHE"] = tempfile.mkdtemp(prefix="moon-rl-test-cache-")
