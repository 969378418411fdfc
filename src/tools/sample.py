"""Generate text from a checkpoint with its own tokenizer: `slm sample CHECKPOINT --prompt ...`.

    slm sample data/models/tiny_final.pt --prompt "def " --max-new-tokens 200 --seed 1
    slm sample final.pt --prompt "def " --prompt "class " --num-samples 3 --stop "\\n\\n"

One sample streams as it is generated; several prompts and samples are generated together in
batches (prompts of different lengths are left-padded) and printed as each batch finishes. A
sample ends at --max-new-tokens, at the end-of-text token, or just before a --stop string.
"""

from __future__ import annotations

import sys

import torch

from src.checkpoint import load_model
from src.errors import SLMError
from src.model.generate import complete


def print_samples(path, prompt="", n=1, max_new_tokens=200, temperature=0.8, top_k=200,
                  top_p=None, seed=None, device="cpu", stop=None, out=None, batch_size=8,
                  stop_at_eot=True):
    """Print n samples for each prompt (a string or a list of them) to out (stdout)."""
    out = out or sys.stdout
    model, tok, _ = load_model(path, device)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [""])
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if batch_size < 1:
        raise SLMError(f"--batch-size must be at least 1 (got {batch_size})")
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev)
    g.manual_seed(seed if seed is not None else torch.seed())
    jobs = [p for p in prompts for _ in range(n)]
    numbered = len(jobs) > 1
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b : b + batch_size]
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  generator=g, stop=stops, stop_at_eot=stop_at_eot)
        if len(chunk) == 1:  # one sample: stream it as it is generated
            if numbered:
                print(f"--- sample {b + 1} ---", file=out)
            out.write(chunk[0])
            out.flush()

            def write(_row, piece):
                out.write(piece)
                out.flush()

            complete(model, tok, chunk, on_text=write, **kw)
            out.write("\n")
        else:
            for i, text in enumerate(complete(model, tok, chunk, **kw)):
                print(f"--- sample {b + i + 1} ---\n{chunk[i]}{text}", file=out)
        out.flush()
