"""`modal deploy modal_app.py` serves a model from the volume: the `serve` function's settings,
offline, and its ASGI app called in-process with a temporary folder standing in for /data."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from serve_util import KEY, make_checkpoint
from starlette.testclient import TestClient

import modal_app
from src.errors import SLMError

pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally")


def deployed_settings(fn) -> dict:
    """What the function would be created with (Modal keeps these in its loader's closure)."""
    from modal._utils.async_utils import synchronizer

    f = synchronizer._translate_in(fn)
    return inspect.getclosurevars(f._load).nonlocals | {"webhook": f._webhook_config}


def test_serve_function_settings():
    spec = modal_app.serve._spec_
    assert spec.gpus == "T4" == modal_app.SERVE_GPU  # the default GPU
    assert list(spec.volumes) == ["/data"] and "slm-data" in repr(spec.volumes["/data"])
    assert "modal.Secret.from_name('slm-api')" in [repr(s) for s in spec.secrets]
    s = deployed_settings(modal_app.serve)
    from modal_proto import api_pb2

    assert s["webhook"].type == api_pb2.WEBHOOK_TYPE_ASGI_APP
    auto = s["autoscaler_settings"]
    assert (auto.min_containers, auto.scaledown_window, auto.max_containers) == (0, 300, 1)
    assert s["max_concurrent_inputs"] == 64 and s["timeout"] == 3600


def test_gpu_and_run_are_chosen_at_deploy_time(tmp_path):
    code = ("import modal_app as m; s = m.serve._spec_; "
            "print(s.gpus, [repr(x) for x in s.secrets])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    for gpu, want in (("L4", "L4"), ("cpu", "None")):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**env, "HOME": str(tmp_path), "SLM_SERVE_GPU": gpu,
                                             "SLM_SERVE_RUN": "my-run"})
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(want + " ") and "SLM_SERVE_RUN" in r.stdout


@pytest.fixture
def volume(tmp_path, monkeypatch):
    """A data root with two final models, b newer than a."""
    (tmp_path / "models").mkdir()
    make_checkpoint(tmp_path / "models/a_final.pt", name="a")
    make_checkpoint(tmp_path / "models/b_final.pt", name="b")
    os.utime(tmp_path / "models/a_final.pt", (1, 1))
    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("SLM_API_KEY", KEY)
    monkeypatch.delenv("SLM_SERVE_RUN", raising=False)
    return tmp_path


def test_deployed_app_serves_the_newest_model_behind_the_key(volume):
    with TestClient(modal_app.serve.local()) as c:
        assert c.get("/v1/models").status_code == 401
        h = {"Authorization": f"Bearer {KEY}"}
        assert [m["id"] for m in c.get("/v1/models", headers=h).json()["data"]] == ["b"]
        r = c.post("/v1/chat/completions", headers=h, json={
            "model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert c.get("/").status_code == 200


def test_deployed_app_serves_a_named_run_and_needs_a_key(volume, monkeypatch):
    monkeypatch.setenv("SLM_SERVE_RUN", "a")
    with TestClient(modal_app.serve.local()) as c:
        models = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert models["data"][0]["id"] == "a"
    monkeypatch.setenv("SLM_SERVE_RUN", "nope")
    with pytest.raises(SLMError, match="runs with a final model: a, b"):
        modal_app.serve.local()
    monkeypatch.delenv("SLM_API_KEY")
    with pytest.raises(SLMError, match="no API key"):
        modal_app.serve.local()
