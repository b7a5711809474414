"""What `pip install moon-rl` puts in site-packages: `moon_rl` and nothing else at the top (issue 15), `rewards/` as
`moon_rl.rewards`, the CLI as `moon_rl.cli`; and a checkout that is not installed still imports the same names."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _tree_packages() -> set[str]:
    """The packages in the repository as they install: moon_rl/ and the folders `package-dir` maps into it."""
    roots = {"moon_rl": ROOT / "moon_rl"} | {name: ROOT / folder for name, folder in SETUPTOOLS["package-dir"].items()}
    return {".".join((name, *init.parent.relative_to(folder).parts))
            for name, folder in roots.items() for init in folder.rglob("__init__.py")}


def test_pyproject_lists_every_package_and_nothing_outside_moon_rl():
    # `packages` is an explicit list (setuptools' `find` cannot see a folder mapped from outside moon_rl/): a new
    # subpackage missing from it would be left out of the wheel, and work only in an editable install.
    assert set(SETUPTOOLS["packages"]) == _tree_packages()
    assert all(name == "moon_rl" or name.startswith("moon_rl.") for name in SETUPTOOLS["packages"])
    assert "py-modules" not in SETUPTOOLS


def test_a_checkout_imports_moon_rl_rewards_without_installing(tmp_path):
    # bench/gpu_check.sh runs from a checkout on PYTHONPATH, moon-rl not installed: `moon_rl.rewards` still resolves to
    # the checkout's rewards/ folder (moon_rl/__init__.py). The editable install's finder is removed to show that.
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import moon_rl.rewards, moon_rl.rewards.text\n"
        "print(moon_rl.rewards.__file__, moon_rl.rewards.text.__file__)\n"
        "print(moon_rl.rewards.available_rewards())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    files, names = result.stdout.splitlines()
    assert files == f"{ROOT / 'rewards' / '__init__.py'} {ROOT / 'rewards' / 'text.py'}"
    assert "'retrieval_logprob'" in names


def test_the_wheel_installs_everything_under_moon_rl(tmp_path):
    # Built without build isolation, so that it needs no network: the setuptools of this environment must be recent
    # enough for pyproject.toml (`build-system.requires`).
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("setuptools is not installed here; the wheel is built without build isolation")
    if int(version.split(".")[0]) < 77:
        pytest.skip(f"setuptools {version} is older than pyproject.toml's build requirement (>=77)")
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for name in ("moon_rl", *SETUPTOOLS["package-dir"].values()):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("moon_rl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"moon_rl", wheel.name.split("-py")[0] + ".dist-info"}
    assert {"moon_rl/cli.py", "moon_rl/rewards/__init__.py", "moon_rl/rewards/registry.py"} <= set(names)
    assert "moon_rl/serve/static/index.html" in names
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "moon-rl = moon_rl.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # Installed into a folder of its own and imported from elsewhere: the wheel's files, not the checkout's.
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    assert {path.name for path in target.iterdir()} - {"bin"} == {"moon_rl", wheel.name.split("-py")[0] + ".dist-info"}
    code = "import moon_rl.cli, moon_rl.rewards; print(moon_rl.cli.__file__, moon_rl.rewards.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(target / "moon_rl" / name) for name in ("cli.py", "rewards/__init__.py")]
