"""`slm serve`: the batching engine gives the same text as plain generation, and the HTTP server
speaks OpenAI's API to the official `openai` client (streaming included), refuses bad requests
with OpenAI's error JSON, checks the API key and keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import ROOT, run_cli
from serve_util import KEY, LiveServer, free_port, make_checkpoint

from src.data.tokenizer import ByteTokenizer
from src.errors import SLMError
from src.model.generate import complete
from src.tools import serve_api as api
from src.tools.serve import check_access, find_model, make_app
from src.tools.serve_engine import Engine, Job, Params

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = ByteTokenizer()
PROMPTS = ["hello", "The cat sat on", "x", "def f(a, b):\n    return", "", "12345678901234567890"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-serve_final.pt")


@pytest.fixture(scope="module")
def live(model_file):
    app = make_app(model_file[0], api_key=KEY, device="cpu", max_batch=8, log=lambda *a: None)
    server = LiveServer(app)
    yield server
    server.stop()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(model, prompt, n, stop=()):
    """Greedy text from the plain generator (src.tools.sample.complete)."""
    return complete(model, TOK, [prompt], max_new_tokens=n, temperature=0, stop=stop)[0]


# ----------------------------------------------------------------------------- the engine


class Collect:
    """A job's events, as the server's queue would receive them."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev[0] == "error" or (ev[0] == "end" and self.ends() == self.rows):
            self.done.set()

    def ends(self):
        return sum(e[0] == "end" for e in self.events)

    def texts(self, rows):
        return ["".join(e[2] for e in self.events if e[0] == "text" and e[1] == r)
                for r in range(rows)]


def submit(engine, prompt, rows=1, **params):
    col = Collect()
    col.rows = rows * (len(prompt) if isinstance(prompt, list) else 1)
    prompts = prompt if isinstance(prompt, list) else [prompt]
    engine.submit(Job([[TOK.eot_id, *TOK.encode(p)] for p in prompts], rows,
                      Params(**params), col))
    return col


def wait(*cols):
    for c in cols:
        assert c.done.wait(60), c.events[-3:]


def test_batched_requests_joining_at_any_time_match_plain_generation(model_file):
    """Requests admitted together, and others joining the running batch later (shorter and
    longer prompts than the batch's cache, so both sides get re-padded), each give exactly the
    greedy text that plain generation gives for that prompt alone."""
    _, model = model_file
    engine = Engine(model, TOK, max_batch=8)
    with engine._cv:  # hold the engine back: the first wave is admitted as one batch
        first = [submit(engine, p, max_tokens=30, temperature=0) for p in PROMPTS[:3]]
    deadline = time.monotonic() + 60
    while not any(c.events for c in first) and time.monotonic() < deadline:
        time.sleep(0.001)
    later = [submit(engine, p, max_tokens=12 + 5 * i, temperature=0)
             for i, p in enumerate(PROMPTS[3:])]
    wait(*first, *later)
    engine.close()
    assert engine.peak_rows >= 3
    for c, p in zip(first, PROMPTS[:3], strict=True):
        assert c.texts(1)[0] == reference(model, p, 30), p
    for i, (c, p) in enumerate(zip(later, PROMPTS[3:], strict=True)):
        assert c.texts(1)[0] == reference(model, p, 12 + 5 * i), p
        assert c.events[-1][0] == "end" and c.events[-1][2] in ("stop", "length")


def test_seeded_sampling_is_the_same_alone_or_in_a_busy_batch(model_file):
    _, model = model_file
    engine = Engine(model, TOK, max_batch=8)
    alone = submit(engine, "hello", rows=2, max_tokens=25, temperature=0.9, top_p=0.95, seed=7)
    wait(alone)
    with engine._cv:
        noise = [submit(engine, p, max_tokens=25, temperature=1.0) for p in PROMPTS]
        busy = submit(engine, "hello", rows=2, max_tokens=25, temperature=0.9, top_p=0.95,
                      seed=7)
    other = submit(engine, "hello", rows=2, max_tokens=25, temperature=0.9, seed=8)
    wait(busy, other, *noise)
    engine.close()
    assert busy.texts(2) == alone.texts(2)
    assert alone.texts(2)[0] != alone.texts(2)[1]  # each choice samples on its own
    assert other.texts(2) != alone.texts(2)
    tiny_p = submit(Engine(model, TOK), "hello", max_tokens=20, temperature=1.0, top_p=1e-9)
    wait(tiny_p)
    assert tiny_p.texts(1)[0] == reference(model, "hello", 20)  # top_p -> 0 is greedy


def test_stop_strings_and_max_tokens_end_a_choice(model_file):
    _, model = model_file
    free = reference(model, "The cat sat on", 40)
    stop = free[10:12]
    engine = Engine(model, TOK)
    col = submit(engine, "The cat sat on", max_tokens=40, temperature=0, stop=(stop,))
    short = submit(engine, "The cat sat on", max_tokens=5, temperature=0)
    wait(col, short)
    engine.close()
    assert col.texts(1)[0] == free[: free.index(stop)]
    assert col.events[-1][:3] == ("end", 0, "stop")
    assert short.events[-1] == ("end", 0, "length", 5)
    assert short.texts(1)[0] == reference(model, "The cat sat on", 5)


def test_a_cancelled_job_leaves_the_batch(model_file):
    _, model = model_file
    engine = Engine(model, TOK)
    events = []

    def deliver(ev):
        events.append(ev)
        job.cancel()  # the client went away after the first piece

    job = Job([[TOK.eot_id, *TOK.encode("hi")]], 1,
              Params(max_tokens=80, temperature=0, ignore_eos=True), deliver)
    engine.submit(job)
    keep = submit(engine, "x", max_tokens=30, temperature=0, ignore_eos=True)
    wait(keep)
    engine.close()
    assert engine.running == 0
    assert not any(e[0] == "end" for e in events) and len(events) <= 2


def test_a_job_that_can_never_fit_is_refused(model_file):
    engine = Engine(model_file[1], TOK, max_batch=2)
    with pytest.raises(ValueError):
        submit(engine, "hi", max_tokens=200)
    with pytest.raises(ValueError):
        submit(engine, "hi", rows=3, max_tokens=5)


# ----------------------------------------------------------------------------- the API


def test_models_and_completions_through_the_openai_client(client, model_file):
    _, model = model_file
    assert [m.id for m in client.models.list().data] == ["tiny-serve"]
    assert client.models.retrieve("tiny-serve").owned_by == "slm"
    out = client.completions.create(model="tiny-serve", prompt="The cat sat on", max_tokens=20,
                                    temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == reference(model, "The cat sat on", 20)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == 1 + len("The cat sat on")
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    two = client.completions.create(model="tiny-serve", prompt=["hello", "x"], max_tokens=8,
                                    temperature=0, n=2, echo=True)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert [c.text for c in two.choices] == [p + reference(model, p, 8)
                                             for p in ("hello", "hello", "x", "x")]


def test_streamed_completion_is_the_same_text_in_pieces(client, model_file):
    _, model = model_file
    stream = client.completions.create(model="tiny-serve", prompt="hello", max_tokens=30,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == reference(model, "hello", 30)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 6


def test_chat_plain_and_streamed(client, live, model_file):
    _, model = model_file
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    prompt = "System: Be brief.\n\nUser: Hi there\n\nAssistant:"
    assert api.render_chat([api.Message(**m) for m in messages], TOK) == prompt
    want = reference(model, prompt[:0] + prompt, 24, stop=api.PLAIN_STOPS)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-serve", messages=messages, max_tokens=24, temperature=0)
    assert raw.headers["x-slm-chat-format"].startswith("plain")
    out = raw.parse()
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want
    chunks = list(client.chat.completions.create(model="tiny-serve", messages=messages,
                                                 max_tokens=24, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_chat_model_gets_the_chat_template_through_the_one_format():
    from src.data.chat import render
    from src.data.tokenizer import with_chat

    chat_tok = with_chat(ByteTokenizer())
    msgs = [api.Message(role="developer", content="be brief"),
            api.Message(role="user", content="yo")]
    want = render(chat_tok, [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "yo"}], add_generation_prompt=True)[0]
    assert api.chat_ids(msgs, chat_tok) == want and want[-1] != chat_tok.chat_ids[1]
    assert api.chat_format(chat_tok) == "template" and api.chat_format(TOK) == "plain"
    assert api.chat_ids(msgs, TOK)[0] == TOK.eot_id  # a base model: plain text after end-of-text


def test_concurrent_streams_are_batched_and_each_complete(live, model_file):
    _, model = model_file
    aclient = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)

    async def one(p):
        stream = await aclient.completions.create(model="tiny-serve", prompt=p, max_tokens=60,
                                                  temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them():
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    engine = live.app.state.server.engine
    engine.peak_rows = 0
    texts = asyncio.run(all_of_them())
    assert texts == [reference(model, p, 60) for p in PROMPTS]
    assert engine.peak_rows > 1  # they shared the batch


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_openai_errors_and_the_server_stays_up(live, client):
    h = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=live.url, headers=h, timeout=60) as http:
        assert error_of(http.post("/v1/completions", content=b'{"prompt": '), 400)["code"] == \
            "invalid_json"
        assert error_of(http.post("/v1/completions", json=[1, 2]), 400)["code"] == "invalid_json"
        assert error_of(http.post("/v1/chat/completions", json={"messages": []}),
                        400)["param"] == "messages"
        for field, value in [("temperature", 5), ("temperature", "hot"), ("max_tokens", 0),
                             ("top_p", 0), ("n", 0), ("stop", ["a", "b", "c", "d", "e"]),
                             ("logprobs", 2), ("presence_penalty", 0.5)]:
            err = error_of(http.post("/v1/completions", json={"prompt": "a", field: value}), 400)
            assert err["param"].startswith(field), (field, err)
        err = error_of(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"}), 404)
        assert err["code"] == "model_not_found" and "tiny-serve" in err["message"]
        err = error_of(http.post("/v1/completions", json={"prompt": "a", "max_tokens": 95}), 413)
        assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        err = error_of(http.post("/v1/completions", json={"prompt": "a" * 200}), 413)
        assert err["param"] == "prompt"
        assert error_of(http.post("/v1/completions", json={"prompt": "a", "max_tokens": 10_000}),
                        413)["param"] == "max_tokens"
        big = {"prompt": "a", "pad": "x" * (1 << 20)}
        assert error_of(http.post("/v1/completions", json=big), 413)["code"] == "request_too_large"
        assert error_of(http.post("/v1/completions", json={"prompt": "a", "n": 9}),
                        400)["param"] == "n"
        assert error_of(http.get("/v1/nowhere"), 404)
        assert error_of(http.get("/v1/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-serve", messages=[])
    assert client.completions.create(model="tiny-serve", prompt="still up", max_tokens=3).choices


def test_the_api_key_is_required_as_a_bearer_token(live):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):
        r = httpx.get(live.url + "/v1/models", headers=headers)
        assert error_of(r, 401)["code"] == "invalid_api_key"
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "a"}, headers=headers)
        assert r.status_code == 401
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(live.url + "/").status_code == 200  # the page itself is public


def test_a_client_that_stops_reading_does_not_hold_the_others(live, client, model_file):
    """A streaming client that never reads its socket; the others are served meanwhile."""
    body = json.dumps({"prompt": "slow", "max_tokens": 90, "stream": True, "ignore_eos": True,
                       "temperature": 0}).encode()
    slow = socket.create_connection(("127.0.0.1", live.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    engine = live.app.state.server.engine
    try:
        for p in PROMPTS[:3]:
            out = client.completions.create(model="tiny-serve", prompt=p, max_tokens=30,
                                            temperature=0)
            assert out.choices[0].text == reference(model_file[1], p, 30)
        deadline = time.monotonic() + 60  # generation for the slow client went on regardless
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0
    finally:
        slow.close()
    assert client.completions.create(model="tiny-serve", prompt="after", max_tokens=3).choices


def test_page_is_served_with_its_script(live):
    r = httpx.get(live.url + "/")
    assert r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "stream: true" in r.text


# ----------------------------------------------------------------------------- access, command line


def test_non_loopback_host_needs_a_key_or_insecure():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        check_access(host, None, False)
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.org"):
        with pytest.raises(SLMError, match="--insecure"):
            check_access(host, None, False)
        check_access(host, "k", False)
        check_access(host, None, True)
    with pytest.raises(SLMError, match="empty"):
        check_access("127.0.0.1", " ", False)


def test_serve_command_refuses_in_one_line(model_file, tmp_path):
    r = run_cli("serve", model_file[0], "--host", "0.0.0.0", timeout=120,
                env={"SLM_API_KEY": ""})
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: --host 0.0.0.0") and "--insecure" in r.stderr
    r = run_cli("serve", tmp_path / "none.pt", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run_cli("serve", model_file[0], "--port", s.getsockname()[1], timeout=120)
    assert r.returncode == 2 and "pick another --port" in r.stderr and r.stderr.count("\n") == 1
    for flag, value in (("--port", "70000"), ("--max-batch", "0"), ("--max-tokens", "0")):
        r = run_cli("serve", model_file[0], flag, value, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith(f"error: slm serve: argument {flag}: "
                                                         f"{value}: use a number")
    r = run_cli("serve", "--help", timeout=120)
    for flag in ("--host", "--port", "--api-key", "--insecure", "SLM_API_KEY", "--device",
                 "--max-batch", "--max-tokens"):
        assert flag in r.stdout


def test_serve_command_serves_and_never_logs_the_key(model_file):
    port = free_port()
    env = {**os.environ, "SLM_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "src", "serve", str(model_file[0]), "--port",
                             str(port), "--device", "cpu"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "did not start"
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer x"}).status_code \
            == 401
        ok = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert "serving on http://127.0.0.1:" in out and "API key: required" in out
    assert "POST /v1/chat/completions" in out and "401" in out  # the access log is there
    assert KEY not in out


# ----------------------------------------------------------------------------- finding the model


def test_find_model_by_run_name_or_newest(tmp_path):
    with pytest.raises(SLMError, match="no models/"):
        find_model(tmp_path)
    (tmp_path / "models").mkdir()
    old, new = tmp_path / "models/a_final.pt", tmp_path / "models/b_final.pt"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (1, 1))
    assert find_model(tmp_path) == new
    assert find_model(tmp_path, "a") == old
    run = tmp_path / "checkpoints/c"
    run.mkdir(parents=True)
    (run / "step_10.pt").write_bytes(b"x")
    (run / "step_200.pt").write_bytes(b"x")
    assert find_model(tmp_path, "c") == run / "step_200.pt"
    with pytest.raises(SLMError, match="runs with a final model: a, b"):
        find_model(tmp_path, "zzz")


def test_bfloat16_weights_serve_a_rope_model(tmp_path):
    """The dtype GPUs get by default (bfloat16), here on the CPU, with RoPE tables kept exact."""
    from starlette.testclient import TestClient

    from src import checkpoint as ckpt
    from src.model.gpt import GPT
    from src.training.config import validate_config

    cfg = validate_config({"name": "rope", "data": {"tokenizer": "bytes"}, "model": {
        "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "pos_emb": "rope",
        "norm": "rmsnorm", "mlp": "swiglu", "bias": False}})
    ckpt.save({"model_state_dict": GPT(cfg.model).state_dict(), "config": cfg.to_dict(),
               "tokenizer": TOK.to_dict()}, tmp_path / "r.pt")
    app = make_app(tmp_path / "r.pt", device="cpu", dtype="bfloat16", log=lambda *a: None)
    model = app.state.server.engine.model
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.rope_cos.dtype == torch.float32
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 12, "n": 2,
                                            "ignore_eos": True})
    assert r.status_code == 200
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["length", "length"]
