"""The installed `modal` client has every feature modal_app.py uses, and pyproject asks for it.

Each feature names the client release it arrived in (from the client's changelog and source), so
a failure here says which floor to raise. Nothing here talks to Modal's servers.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version

import pytest
from conftest import ROOT
from packaging.version import Version

modal = pytest.importorskip("modal")


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


# feature -> (the release that brought it, a check on the installed client)
FEATURES = {
    "@app.function(nonpreemptible=...)": (
        "1.2.3",
        lambda: "nonpreemptible" in _params(modal.App.function),
    ),
    "@app.function(single_use_containers=...)": (
        "1.3.0",
        lambda: "single_use_containers" in _params(modal.App.function),
    ),
    "@app.function GPU, CPU, memory, timeout, retries, secrets, volumes, env": (
        "1.0",
        lambda: (
            {"gpu", "cpu", "memory", "timeout", "retries", "secrets", "volumes", "env", "image"}
            <= _params(modal.App.function)
        ),
    ),
    "modal.Retries(max_retries, initial_delay, backoff_coefficient)": (
        "1.0",
        lambda: {"max_retries", "initial_delay", "backoff_coefficient"} <= _params(modal.Retries),
    ),
    "Function.with_options(gpu, timeout, retries, cpu, memory, secrets)": (
        "1.4.3",
        lambda: (
            {"gpu", "timeout", "retries", "cpu", "memory", "secrets"}
            <= _params(modal.Function.with_options)
        ),
    ),
    "modal.clustered(size, rdma)": ("1.6.0", lambda: {"size", "rdma"} <= _params(modal.clustered)),
    "modal.Cluster.from_context / container_rank / container_ips(family)": (
        "1.6.0",
        lambda: (
            hasattr(modal.Cluster, "from_context")
            and hasattr(modal.Cluster, "container_rank")
            and "family" in _params(modal.Cluster.container_ips)
        ),
    ),
    "modal.Volume.from_name(create_if_missing) / commit / reload": (
        "1.0",
        lambda: (
            "create_if_missing" in _params(modal.Volume.from_name)
            and hasattr(modal.Volume, "commit")
            and hasattr(modal.Volume, "reload")
        ),
    ),
    "modal.Volume.listdir / iterdir / read_file (slm status --modal)": (
        "1.0",
        lambda: (
            {"path", "recursive"} <= _params(modal.Volume.listdir)
            and "path" in _params(modal.Volume.read_file)
            and hasattr(modal.Volume, "iterdir")
        ),
    ),
    "modal.Dict.from_name(create_if_missing) / put(skip_if_exists) (run lock)": (
        "1.0",
        lambda: (
            "create_if_missing" in _params(modal.Dict.from_name)
            and "skip_if_exists" in _params(modal.Dict.put)
        ),
    ),
    "App.app_id / App.get_dashboard_url (what a launch prints)": (
        "1.3.2",
        lambda: (
            isinstance(inspect.getattr_static(modal.App, "app_id"), property)
            and hasattr(modal.App, "get_dashboard_url")
        ),
    ),
    "FunctionCall.get(timeout) / .object_id": (
        "1.0",
        lambda: "timeout" in _params(modal.FunctionCall.get),
    ),
    "modal.exception.FunctionTimeoutError / NotFoundError": (
        "1.0",
        lambda: (
            hasattr(modal.exception, "FunctionTimeoutError")
            and hasattr(modal.exception, "NotFoundError")
        ),
    ),
    "Image.add_local_dir(ignore=...)": (
        "1.0",
        lambda: "ignore" in _params(modal.Image.add_local_dir),
    ),
    "modal.Secret.from_name": ("1.0", lambda: "name" in _params(modal.Secret.from_name)),
    "modal.is_local": ("1.0", lambda: callable(modal.is_local)),
}


def _floor() -> Version:
    """The `modal>=X` floor in pyproject.toml's dependencies."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"modal>=([0-9][0-9.]*)', text)
    assert m, "pyproject.toml must ask for modal>=<version>"
    return Version(m.group(1))


@pytest.mark.parametrize("feature", FEATURES)
def test_installed_client_has_every_feature_the_app_uses(feature):
    since, present = FEATURES[feature]
    assert present(), (
        f"modal {version('modal')} lacks {feature} (added in modal {since}): "
        f"pip install -U 'modal>={since}'"
    )


def test_pyproject_floor_covers_every_feature_and_the_installed_client():
    floor, installed = _floor(), Version(version("modal"))
    newest = max(Version(since) for since, _ in FEATURES.values())
    assert floor >= newest, f"pyproject asks for modal>={floor}; the app needs >= {newest}"
    assert installed >= floor, f"modal {installed} is installed; pyproject asks for >= {floor}"
