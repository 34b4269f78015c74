"""Shared fixtures.

``require(condition, reason)`` is how a test that needs root, FUSE, loop devices or network
namespaces bows out on a laptop.  Under CI (``CI=true``) the same call fails the test instead:
a skip there would hide a broken environment.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = str(ROOT / "plugins" / "pairvol.py")
VENV_BIN = ROOT / ".venv" / "bin"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI but unavailable: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_programs(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    require(not missing, f"needs {', '.join(missing)} (run tools/setup)")


@pytest.fixture(autouse=True)
def _log_seed(request: pytest.FixtureRequest) -> Iterator[None]:
    """Seed Python's RNG per test and print the seed, so a failure can be replayed."""
    seed = int(os.environ.get("PAIRVOL_TEST_SEED", random.randrange(1 << 32)))
    random.seed(seed)
    yield
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"random seed: PAIRVOL_TEST_SEED={seed}", file=sys.stderr)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def plugin_path() -> str:
    return PLUGIN


@pytest.fixture
def pairvol_bin() -> str:
    """The installed console script (a subprocess sees exactly what a user sees)."""
    return str(VENV_BIN / "pairvol")
