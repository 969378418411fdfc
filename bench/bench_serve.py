"""Load test of `slm serve`: concurrent streaming clients, time to first token and tokens/s.

    python bench/bench_serve.py                          # tiny and gpt_124m shapes, CPU
    python bench/bench_serve.py --shapes gpt_124m --device cuda --new-tokens 128

The server runs in its own process (uvicorn, the real app) with random weights of each shape
(speed does not depend on them) and a stand-in tokenizer of the shape's vocabulary. For 1, 4 and
16 clients at once, each client streams one completion of --new-tokens tokens (ignore_eos, so
every answer has the same length) after a --prompt-tokens prompt; every response must end with
its finish reason, its usage and [DONE]. Printed: median and worst time to first token, tokens/s
of all clients together, and the server's peak memory (resident set; GPU memory on CUDA).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class StandInTokenizer:
    """Any vocabulary size: a token per printable character (enough to serve random weights)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eot_id = vocab_size, vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) % (self.vocab_size - 1) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(33 + i % 90) for i in ids)


def run_server(shape: str, port: int, device: str, max_batch: int) -> None:
    """The server process: random weights of a config's shape behind the real app."""
    import torch
    import uvicorn
    from starlette.routing import Route

    from src.hardware import resolve_device
    from src.model.gpt import GPT
    from src.tools.serve import build_app
    from src.training.config import load_config

    cfg = load_config(ROOT / "configs" / f"{shape}.yaml").model
    if cfg.vocab_size is None:
        cfg.vocab_size = 50257
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = GPT(cfg).to(dev).eval()
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)
    app = build_app(model, StandInTokenizer(cfg.vocab_size), shape, max_batch=max_batch,
                    log=lambda *a: None)

    async def memory(request):  # peak memory of this process, for the table
        from starlette.responses import JSONResponse

        rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                   if line.startswith("VmHWM"))
        gpu = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
        eng = app.state.server.engine
        return JSONResponse({"rss": rss, "gpu": gpu, "cache": eng.peak_cache_bytes,
                             "rows": eng.peak_rows})

    app.router.routes.append(Route("/bench/memory", memory))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def one_client(http, prompt: str, new_tokens: int) -> tuple[float, int]:
    """(time to first token, tokens received) of one streamed completion; checks it completed."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "stream": True, "ignore_eos": True,
            "temperature": 1.0, "stream_options": {"include_usage": True}}
    t0, first, text, finish, usage, done = time.perf_counter(), None, "", None, None, False
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                usage = msg["usage"]
            for c in msg["choices"]:
                if c["text"] and first is None:
                    first = time.perf_counter() - t0
                text += c["text"]
                finish = c["finish_reason"] or finish
    assert done and finish == "length" and usage["completion_tokens"] == new_tokens, (finish, usage)
    return first, usage["completion_tokens"]


async def load(url: str, clients: int, prompt: str, new_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_client(http, prompt, new_tokens) for _ in range(clients)))
        wall = time.perf_counter() - t0
        mem = (await http.get("/bench/memory")).json()
    ttft = [r[0] for r in res]
    return {"clients": clients, "ttft_med": statistics.median(ttft), "ttft_max": max(ttft),
            "tok_s": sum(r[1] for r in res) / wall, "wall": wall, **mem}


def bench_shape(shape: str, args) -> list[dict]:
    import httpx

    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen([sys.executable, __file__, "--serve", shape, "--port", str(port),
                             "--device", args.device, "--max-batch", str(args.max_batch)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(url + "/v1/models", timeout=5)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {shape} server did not start") from None
                time.sleep(0.5)
        prompt = "".join(chr(97 + i % 26) for i in range(args.prompt_tokens))
        asyncio.run(load(url, 1, prompt, 4))  # warm-up
        return [{"shape": shape, **asyncio.run(load(url, n, prompt, args.new_tokens))}
                for n in args.clients]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["tiny", "gpt_124m"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        run_server(args.serve, args.port, args.device, args.max_batch)
        return
    import torch

    rows = [r for shape in args.shapes for r in bench_shape(shape, args)]
    print(f"\nslm serve load test: {args.prompt_tokens}-token prompts, {args.new_tokens} new "
          f"tokens per client, streamed; {args.device}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'shape':<10} {'clients':>7} {'TTFT med':>9} {'TTFT max':>9} {'tok/s':>8} "
          f"{'wall s':>7} {'peak RSS':>9} {'KV cache':>9} {'rows':>5}")
    for r in rows:
        print(f"{r['shape']:<10} {r['clients']:>7} {r['ttft_med'] * 1e3:>7.0f}ms "
              f"{r['ttft_max'] * 1e3:>7.0f}ms {r['tok_s']:>8.1f} {r['wall']:>7.1f} "
              f"{r['rss'] / 2**20:>7.0f}MB {r['cache'] / 2**20:>7.1f}MB {r['rows']:>5}"
              + (f"  GPU {r['gpu'] / 2**20:.0f}MB" if r["gpu"] else ""))
    print("all responses completed (finish_reason 'length', usage, [DONE])")
    print("reproduce: python bench/bench_serve.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
