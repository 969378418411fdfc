"""Helpers for the server's tests: a tiny checkpoint, and the real app on a real port."""

from __future__ import annotations

import socket
import threading
import time

import torch

from src import checkpoint as ckpt
from src.data.tokenizer import ByteTokenizer
from src.model.gpt import GPT
from src.training.config import validate_config

KEY = "sk-slm-test-7f3e9a"  # distinctive, so a test can look for it in logs


def make_checkpoint(path, block_size=96, seed=0, name="tiny-serve"):
    """An slm model file of a tiny random model with the bytes tokenizer; returns (path, model)."""
    cfg = validate_config({"name": name, "data": {"tokenizer": "bytes"}, "model": {
        "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": block_size,
        "tie_embeddings": False}})
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    with torch.no_grad():  # sharper than the 0.02 init: greedy text that does not just repeat
        model.lm_head.weight.mul_(5)
    ckpt.save({"model_state_dict": model.state_dict(), "config": cfg.to_dict(),
               "tokenizer": ByteTokenizer().to_dict()}, path)
    return path, model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
