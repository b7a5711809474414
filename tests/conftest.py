import os

import pytest

# Tests never touch the network and never report telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_SESSION_CACHE: str | None = None  # the cache this run created (and removes when it ends)


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One torch thread per test worker (`make test` runs two): two workers each with torch's default of a thread
        # per core oversubscribe the cores, and tiny-model steps then run many times slower. Subprocesses inherit it.
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
    # Builtin models and synthetic catalogues are built into a per-session cache, never the user's. Test workers
    # inherit the controller's (MOON_RL_CACHE is set before they start) and share its builds (cache.build_lock).
    global _SESSION_CACHE
    if "MOON_RL_CACHE" not in os.environ:
        import tempfile

        _SESSION_CACHE = os.environ["MOON_RL_CACHE"] = tempfile.mkdtemp(prefix="moon-rl-test-cache-")


def pytest_unconfigure(config):
    # A cache the caller named (MOON_RL_CACHE set) is theirs to keep; the one this run made goes with it.
    if _SESSION_CACHE is not None:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def _digests(folder):
    """Every file under `folder`: its path relative to `folder` -> the sha256 of its bytes."""
    import hashlib

    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="session")
def synthetic_catalogue():
    """`synthetic_catalogue(n_products, seed, image_size, **options) -> Path`: the builtin synthetic catalogue with
    those options (`SyntheticConfig`'s fields), built once per test session into the session's cache, where recipes
    naming `data.synthetic` with the same options find it too.

    The folder is shared and read only: a test that changes a catalogue copies it first
    (`shutil.copytree(synthetic_catalogue(...), tmp_path / "cat")`). When the session ends, every folder handed out
    must hold the files it held when it was first handed out, byte for byte.
    """
    from pathlib import Path

    from moon_rl.data.catalogue import BUILTIN_SYNTHETIC, resolve_catalogue_path
    from moon_rl.data.synthetic import SyntheticConfig

    built: dict[SyntheticConfig, tuple[Path, dict[str, str]]] = {}

    def make(n_products: int, seed: int, image_size: int, **options) -> Path:
        config = SyntheticConfig(n_products=n_products, seed=seed, image_size=image_size, **options)
        if config not in built:
            folder = Path(resolve_catalogue_path(BUILTIN_SYNTHETIC, config))
            built[config] = folder, _digests(folder)
        return built[config][0]

    yield make
    for config, (folder, before) in built.items():
        after = _digests(folder)
        changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        assert not changed, (
            f"a test changed the shared synthetic catalogue {folder} ({config}): {changed[:10]}"
            f"{f' and {len(changed) - 10} more' if len(changed) > 10 else ''} were changed, added or removed. It is "
            "shared by the whole session: copy it first (shutil.copytree(synthetic_catalogue(...), tmp_path / 'cat')) "
            "and change the copy.")
