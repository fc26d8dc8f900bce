"""The champion as MLflow's own tools see it: a LoggedModel in the transformers flavor that
``mlflow.transformers.load_model`` and ``mlflow.pyfunc`` load, and that ``mlflow models
serve`` (``python -m rlhf_tasks.pipeline.serve``) answers chat requests with over REST.

The tiny built-in actor (tiny_model_dir, built once per session) is registered the way the
register stage does it, against a real ``mlflow server`` on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from rlhf_tasks.tracking import Tracker, register_model
from tests.mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.slow

GEN = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    """A server whose model ``actor`` has version 1, the tiny actor, as ``champion``."""
    server = MlflowServer(tmp_path_factory.mktemp("serve-mlflow"))
    server.start()
    t = Tracker.start(server.url, "serve", "ppo")
    t.close()
    reg = register_model(server.url, tiny_model_dir, "actor", "eval/aligned_reward", 1.0, t.run_id,
                         artifact_path="ppo-actor", model_config=GEN, model_tags={"rlhf.role": "aligned"})
    yield server, reg, t.run_id
    server.stop()


def post(url: str, body: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_champion_is_a_logged_model_mlflow_loads(registry, monkeypatch):
    """The version's source is the LoggedModel; transformers.load_model gives a pipeline that
    generates, pyfunc answers a chat request; the weights are stored once."""
    import mlflow
    from mlflow import MlflowClient

    server, reg, run_id = registry
    assert reg["source"] == f"models:/{reg['model_id']}"
    client = MlflowClient(server.url)
    model = client.get_logged_model(reg["model_id"])
    assert model.source_run_id == run_id and model.tags["rlhf.role"] == "aligned"
    assert model.model_type == "chat" and model.status.value == "READY"
    weights = list((server.dir / "artifacts").rglob("*.safetensors"))
    assert len(weights) == 1, weights  # one copy: the LoggedModel's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    pipe = mlflow.transformers.load_model("models:/actor@champion")
    out = pipe("\n\nHuman: Hello\n\nAssistant:", max_new_tokens=4, do_sample=False)
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"].startswith("\n\nHuman: Hello")
    chat = mlflow.pyfunc.load_model("models:/actor@champion").predict(
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
    assert chat[0]["choices"][0]["message"]["role"] == "assistant"
    assert chat[0]["usage"]["completion_tokens"] <= 4


def test_serve_answers_chat_over_rest(registry, tmp_path):
    """`python -m rlhf_tasks.pipeline.serve` runs `mlflow models serve` on loopback: a chat
    request gets text back, a malformed one a 4xx with a message, and the server lives on."""
    server, _, _ = registry
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "RLHF_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_tasks.pipeline.serve", "--name", "actor", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the scoring server did not start"
                time.sleep(0.5)
        chat = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6}).encode()
        code, out = post(f"{url}/invocations", chat)
        assert code == 200, out
        # one OpenAI-style chat.completion per request
        assert out[0]["object"] == "chat.completion" and isinstance(out[0]["choices"][0]["message"]["content"], str)
        assert out[0]["usage"]["completion_tokens"] <= 6
        for bad in (b"{not json", json.dumps({"prompt": 3}).encode()):
            code, err = post(f"{url}/invocations", bad)
            assert 400 <= code < 500 and err.get("message"), (code, err)
        code, _ = post(f"{url}/invocations", chat)
        assert code == 200 and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_champion_registered_before_loggedmodels(registry, tiny_model_dir, tmp_path):
    """A version whose source is a plain directory (how versions were registered before):
    our own loader still reads it, and serve refuses it with a clear message."""
    from mlflow import MlflowClient

    from rlhf_tasks.pipeline.serve import NotServable, servable_uri
    from rlhf_tasks.runtime.models import load_tokenizer
    from rlhf_tasks.tracking.registry import download_version

    server, reg, run_id = registry
    client = MlflowClient(server.url)
    client.log_artifacts(run_id, str(tiny_model_dir), "model")
    client.create_registered_model("old-actor")
    mv = client.create_model_version("old-actor", f"{client.get_run(run_id).info.artifact_uri}/model", run_id=run_id)
    client.set_registered_model_alias("old-actor", "champion", mv.version)
    with pytest.raises(NotServable, match="registered before the pipeline logged MLflow models"):
        servable_uri(server.url, "old-actor", "champion")
    old = download_version(server.url, mv.source, tmp_path / "old")
    new = download_version(server.url, reg["source"], tmp_path / "new")
    for d in (old, new):
        assert (Path(d) / "config.json").is_file() and load_tokenizer(str(d)).eos_token_id is not None
    assert servable_uri(server.url, "actor", "champion") == "models:/actor@champion"
