"""moon-rl: reasoning-aware product representation learning on TRL."""

import sys
from importlib.machinery import ModuleSpec
from importlib.util import spec_from_file_location
from pathlib import Path

__version__ = "0.1.0"

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT_REWARDS = _PACKAGE.parent / "rewards"


class _CheckoutRewardsFinder:
    """
    Finds `moon_rl.rewards` in a checkout's top-level `rewards/` folder, for a checkout run without installing.

    The repository keeps the reward package at its top level and installs it as `moon_rl.rewards` (pyproject.toml's
    `package-dir`; an editable install maps the name alike). A checkout put on `PYTHONPATH` instead, as
    bench/gpu_check.sh does on machines without moon-rl installed, has no `moon_rl/rewards/` for the name to resolve
    to: this finder, last on `sys.meta_path`, maps it. Only the package itself; its modules follow its `__path__`.
    """

    @staticmethod
    def find_spec(fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if fullname != "moon_rl.rewards":
            return None
        return spec_from_file_location(
            fullname, _CHECKOUT_REWARDS / "__init__.py", submodule_search_locations=[str(_CHECKOUT_REWARDS)]
        )


# Installed from a wheel, `moon_rl/rewards/` exists and the finder is never added. `pyproject.toml` beside the folder
# makes sure the `rewards/` next to this package is the checkout's, not some other distribution's.
if (
    not (_PACKAGE / "rewards").is_dir()
    and (_CHECKOUT_REWARDS / "__init__.py").is_file()
    and (_PACKAGE.parent / "pyproject.toml").is_file()
    and not any(getattr(finder, "__name__", "") == _CheckoutRewardsFinder.__name__ for finder in sys.meta_path)
):
    sys.meta_path.append(_CheckoutRewardsFinder)
