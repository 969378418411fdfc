"""Continuous batching for `slm serve`: requests join and leave one running batch between steps.

    engine = Engine(model, tok, max_batch=16)
    engine.submit(Job([[tok.eot_id, *tok.encode("def ")]], n=2, params=Params(max_tokens=50),
                      deliver=print))

One thread owns the model. Each turn of its loop it
  1. admits waiting requests that fit: their distinct prompts are prefilled together (one forward,
     last-position logits only), each choice samples its first token, and their keys and values
     join the running batch's cache, left-padded to a common length (the model's `pad=`);
  2. runs one forward pass of one token for every running row, and samples each row with its own
     temperature, top_p and random generator;
  3. hands each row's new text to its request's `deliver` callback and drops finished, stopped or
     abandoned rows, trimming the cache to what the remaining rows still need.

`deliver` must never block (the server's callback puts the event on the request's own queue), so a
client that stops reading holds nobody else up: its queue grows by at most its max_tokens pieces.
Memory is bounded: at most `max_batch` rows and `block_size` cache positions, and a prefill of at
most `prefill_tokens` prompt tokens per step (one larger request is prefilled alone).

Events a job receives: ("text", choice, piece), ("end", choice, finish_reason, tokens) with
finish_reason "stop" (end-of-text token or a stop string) or "length" (max_tokens), and
("error", message) when generation failed (the engine carries on with the other requests).
"""

from __future__ import annotations

import collections
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from src.model.generate import _held_back
from src.model.gpt import KVCache


class Busy(Exception):
    """The waiting queue is full (the server answers 503; clients retry)."""


@dataclass(frozen=True)
class Params:
    """Sampling settings of one request."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past the end-of-text token (benchmarks)


class Job:
    """One request: prompts (token ids, end-of-text first) x n choices; choice i*n+j is prompt i's
    j-th sample. `deliver(event)` is called from the engine's thread."""

    def __init__(self, prompts: list[list[int]], n: int, params: Params,
                 deliver: Callable[[tuple], None]):
        self.prompts, self.n, self.params, self.deliver = prompts, n, params, deliver
        self.cancelled = False

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def cancel(self) -> None:
        """The client went away: its rows leave the batch at the next step."""
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    job: Job
    choice: int
    generator: torch.Generator | None
    sampled: int = 0  # tokens sampled so far (the end-of-text token included)
    ids: list[int] = field(default_factory=list)  # the text's tokens
    text: str = ""
    shown: int = 0  # characters of text already delivered
    done: bool = False

    @property
    def need(self) -> int:
        """Forward passes this row still needs (each samples one token)."""
        return self.job.params.max_tokens - self.sampled


class _Cache(KVCache):
    """A KVCache over a given tensor (L, 2, B, H, capacity, D) with `pos` positions written."""

    def __init__(self, kv: torch.Tensor, pos: int):
        self.kv, self.pos, self.max_len = kv, pos, kv.size(4)


class Engine:
    def __init__(self, model, tok, max_batch: int = 16, max_waiting: int = 256,
                 prefill_tokens: int = 8192, log=print):
        self.model, self.tok, self.log = model, tok, log
        self.cfg = model.cfg
        self.max_batch, self.max_waiting, self.prefill_tokens = max_batch, max_waiting, prefill_tokens
        self.device = next(model.parameters()).device
        self.dtype = model.transformer.wte.weight.dtype
        self.vocab = self.cfg.vocab_size or self.cfg.padded_vocab
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._rows: list[_Row] = []
        self._kv: torch.Tensor | None = None  # (L, 2, B, H, capacity, D)
        self._pos = 0  # cache positions in use (the same for every row: rows are left-padded)
        self._pad: list[int] = []  # left padding per row
        self._last: list[int] = []  # each row's newest token (the next step's input)
        self.peak_rows = 0
        self.peak_cache_bytes = 0

    # ------------------------------------------------------------------ the requests' side

    def submit(self, job: Job) -> None:
        """Queue a job (raises Busy when the queue is full, ValueError when it can never fit)."""
        width = max(len(p) for p in job.prompts)
        if width + job.params.max_tokens - 1 > self.cfg.block_size or job.rows > self.max_batch:
            raise ValueError("the job does not fit the model's context or the batch")
        with self._cv:
            if self._closed:
                raise Busy("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise Busy(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="slm-engine", daemon=True)
                self._thread.start()
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def running(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ the model's thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._rows:
                    self._cv.wait()
                if self._closed:
                    jobs = list(self._waiting) + list({id(r.job): r.job for r in self._rows}.values())
                    self._waiting.clear()
                    break
                new = self._admissible()
            try:
                with torch.inference_mode():
                    if new:
                        self._admit(new)
                    if self._rows:
                        self._step()
            except Exception as e:  # fail the requests in flight, keep serving the others
                self.log(f"error: generation failed: {type(e).__name__}: {e}")
                for job in {id(j): j for j in [*new, *(r.job for r in self._rows)]}.values():
                    job.deliver(("error", f"generation failed: {type(e).__name__}"))
                self._set_batch([], None, 0, [])
        for job in jobs:
            job.deliver(("error", "the server is shutting down"))

    def _admissible(self) -> list[Job]:
        """Waiting jobs (in order) that fit beside the running rows now."""
        rows = len(self._rows)
        pos = self._pos if rows else 0
        need = max((r.need for r in self._rows), default=0)
        out, prefill = [], 0
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            width = max(len(p) for p in job.prompts)
            new_pos, new_need = max(pos, width), max(need, job.params.max_tokens - 1)
            cost = width * len(job.prompts)
            if (rows + job.rows > self.max_batch or new_pos + new_need > self.cfg.block_size
                    or (out and prefill + cost > self.prefill_tokens)):
                break
            out.append(self._waiting.popleft())
            rows, pos, need, prefill = rows + job.rows, new_pos, new_need, prefill + cost
        return out

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the jobs' prompts, sample each choice's first token, join the batch."""
        prompts = [p for job in jobs for p in job.prompts]
        width = max(len(p) for p in prompts)
        pad = [width - len(p) for p in prompts]
        idx = torch.tensor([[self.tok.eot_id] * n + p for n, p in zip(pad, prompts, strict=True)],
                           device=self.device)
        cfg = self.cfg
        kv = torch.zeros(cfg.n_layer, 2, len(prompts), cfg.n_head, width, cfg.head_dim,
                         device=self.device, dtype=self.dtype)
        logits, _ = self.model(idx, cache=_Cache(kv, 0), pad=pad if max(pad) else None,
                               last_only=True)
        rows, which, k = [], [], 0  # which: the prompt each row continues
        for job in jobs:
            for i in range(len(job.prompts)):
                for j in range(job.n):
                    seed = None if job.params.seed is None else job.params.seed + i * job.n + j
                    rows.append(_Row(job, i * job.n + j, self._generator(seed, job.params)))
                    which.append(k)
                k += 1
        pick = torch.tensor(which, device=self.device)
        first = self._sample(logits[pick, -1], rows)
        kv = kv.index_select(2, pick)
        pad = [pad[i] for i in which]
        keep = [i for i, (r, t) in enumerate(zip(rows, first, strict=True)) if not self._take(r, t)]
        if keep:
            self._merge([rows[i] for i in keep], kv[:, :, keep], width, [pad[i] for i in keep],
                        [first[i] for i in keep])

    def _step(self) -> None:
        """One new token for every running row."""
        live = [i for i, r in enumerate(self._rows) if not r.job.cancelled]
        if len(live) < len(self._rows):
            self._compact(live)
            if not self._rows:
                return
        cache = _Cache(self._kv, self._pos)
        x = torch.tensor(self._last, device=self.device)[:, None]  # (B, 1)
        logits, _ = self.model(x, cache=cache, pad=self._pad if max(self._pad) else None)
        self._pos = cache.pos
        toks = self._sample(logits[:, -1], self._rows)
        self._last = toks
        finished = [self._take(r, t) for r, t in zip(self._rows, toks, strict=True)]
        if any(finished):
            self._compact([i for i, f in enumerate(finished) if not f])

    # ------------------------------------------------------------------ the batch's cache

    def _set_batch(self, rows, kv, pos, pad, last=None) -> None:
        self._rows, self._kv, self._pos, self._pad = rows, kv, pos, pad
        self._last = last if last is not None else [0] * len(rows)
        self.peak_rows = max(self.peak_rows, len(rows))
        if kv is not None:
            self.peak_cache_bytes = max(self.peak_cache_bytes, kv.numel() * kv.element_size())

    def _new_kv(self, rows: int, capacity: int) -> torch.Tensor:
        c = self.cfg  # zeros: padding slots are masked, but must not hold NaNs
        return torch.zeros(c.n_layer, 2, rows, c.n_head, capacity, c.head_dim, device=self.device,
                           dtype=self.dtype)

    def _merge(self, rows, kv, width, pad, first) -> None:
        """Join prefilled rows (cache kv of `width` positions) to the running batch."""
        old = len(self._rows)
        old_pos = self._pos if old else 0
        pos = max(old_pos, width)
        need = max(r.need for r in [*self._rows, *rows])
        merged = self._new_kv(old + len(rows), pos + need)
        if old:
            merged[:, :, :old, :, pos - old_pos : pos] = self._kv[:, :, :, :, :old_pos]
        merged[:, :, old:, :, pos - width : pos] = kv
        self._set_batch([*self._rows, *rows], merged, pos,
                        [p + pos - old_pos for p in self._pad] + [p + pos - width for p in pad],
                        [*self._last, *first])

    def _compact(self, keep: list[int]) -> None:
        """Keep only rows `keep`; drop the leading positions that are padding for all of them."""
        if not keep:
            self._set_batch([], None, 0, [])
            return
        rows = [self._rows[i] for i in keep]
        cut = min(self._pad[i] for i in keep)
        pos = self._pos - cut
        kv = self._new_kv(len(keep), pos + max(r.need for r in rows))
        kv[:, :, :, :, :pos] = self._kv[:, :, keep, :, cut : self._pos]
        self._set_batch(rows, kv, pos, [self._pad[i] - cut for i in keep],
                        [self._last[i] for i in keep])

    # ------------------------------------------------------------------ sampling and text

    def _generator(self, seed: int | None, params: Params) -> torch.Generator | None:
        if params.temperature <= 0:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(seed if seed is not None else secrets.randbits(63))
        return g

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """One token per row from logits (B, V): greedy at temperature 0, else sampled with the
        row's temperature, top_p and generator."""
        logits = logits[:, : self.vocab].float()
        out = logits.argmax(dim=-1)
        hot = [i for i, r in enumerate(rows) if r.job.params.temperature > 0]
        if hot:
            temp = torch.tensor([rows[i].job.params.temperature for i in hot], device=self.device)
            probs = F.softmax(logits[hot] / temp[:, None], dim=-1)
            top_p = torch.tensor([rows[i].job.params.top_p for i in hot], device=self.device)
            if bool((top_p < 1).any()):
                sp, si = probs.sort(dim=-1, descending=True)
                drop = sp.cumsum(-1) - sp >= top_p[:, None]  # keep the smallest set reaching p
                drop[:, 0] = False
                probs = torch.zeros_like(probs).scatter(-1, si, sp.masked_fill(drop, 0.0))
            picks = [torch.multinomial(probs[k], 1, generator=rows[i].generator)
                     for k, i in enumerate(hot)]
            out[hot] = torch.cat(picks)
        return out.tolist()

    def _take(self, row: _Row, t: int) -> bool:
        """Add token t to a row, deliver the text that is safe to show; True when it finished."""
        p = row.job.params
        row.sampled += 1
        finish = None
        if (t == self.tok.eot_id or t in (getattr(self.tok, "chat_ids", None) or ())) and not p.ignore_eos:
            finish = "stop"
        else:
            row.ids.append(t)
            row.text = self.tok.decode(row.ids)
            hits = [row.text.find(s) for s in p.stop if s in row.text]
            if hits:
                row.text, finish = row.text[: min(hits)], "stop"
        if finish is None and row.sampled >= p.max_tokens:
            finish = "length"
        end = len(row.text) if finish else len(row.text) - _held_back(row.text, p.stop)
        if end > row.shown:
            row.job.deliver(("text", row.choice, row.text[row.shown : end]))
            row.shown = end
        if finish:
            row.done = True
            row.job.deliver(("end", row.choice, finish, row.sampled))
        return finish is not None
