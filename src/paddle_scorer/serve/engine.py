"""The one thread that runs the model, and how requests that arrive together share its forwards.

Request handlers submit a job (one :class:`Work` per prompt) and await its future. The engine thread
takes every job already waiting, waits up to ``window`` seconds for more (until ``max_batch``
sequences), and runs, in chunks of at most ``max_batch`` sequences:

1. one :meth:`Backend.sequence_logprobs` pass over every prompt whose log-probs are echoed;
2. one-token generations (lm-eval's ``max_tokens: 1``): the token is read off the distribution of
   pass 1 when there was one, else of one batched :meth:`Backend.next_token_logprobs`;
3. longer generations, decoded together on one KV cache (``Backend.decode_start/decode_step``;
   finished rows leave the batch). Between decoding steps, newly arrived jobs that need no decoding
   (scoring) are served at once; new generations wait for the next round. A backend without the
   batched methods decodes one sequence at a time with ``start/step``.

Every answer equals what the same request gets alone: batching changes only the float32 summation
order (the tests hold it to 1e-5). Sampling draws from one RNG per prompt, seeded by the request, with
``generate --sample``'s rule (softmax of log-probs / temperature; ``top_p`` keeps the smallest set of
tokens whose probability reaches it), so a prompt's tokens never depend on its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace

import numpy as np

from paddle_scorer.serve.codec import Codec, TextStream
from paddle_scorer.serve.protocol import Sampling

log = logging.getLogger("paddle_scorer.serve")


class EngineStopped(Exception):
    """The server is shutting down: the request was not run."""


@dataclass(frozen=True)
class GenSpec:
    max_tokens: int  # >= 1
    sampling: Sampling
    stop: tuple[str, ...] = ()
    top: int = 0  # top entries recorded per generated token


@dataclass
class Work:
    """One prompt of a request: its token ids, and what to compute for it."""

    prompt: list[int]
    score_top: int | None = None  # echo: log-probs at every prompt position, with this many top entries
    gen: GenSpec | None = None


@dataclass
class Generation:
    ids: list[int]  # tokens of the answer (a final EOS included: its probability is an output too)
    logprobs: list[float]  # of each chosen token, float32 values
    top_ids: list[np.ndarray]
    top_logprobs: list[np.ndarray]  # from the same float32 row as the chosen token's value
    token_text: list[str]  # each token's piece of ``text`` (an EOS: its own text, not in ``text``)
    offsets: list[int]  # where each token's piece starts in ``text``
    text: str  # after the stop string cut; without a final EOS
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    generated: int  # tokens computed (usage), >= len(ids) when a stop string cut some off


@dataclass
class Outcome:
    scored: object | None  # backend.SequenceLogprobs, top entries trimmed to the work's score_top
    generation: Generation | None


def choose(lp: np.ndarray, sampling: Sampling, rng) -> int:
    """Greedy at temperature 0, else a seeded draw (``generate --sample``'s rule, plus top_p)."""
    if sampling.temperature == 0:
        return int(np.argmax(lp))
    z = lp.astype(np.float64) / sampling.temperature
    p = np.exp(z - z.max())
    if sampling.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        mass = np.cumsum(p[order]) / p.sum()
        keep = order[: int(np.searchsorted(mass, sampling.top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q
    return int(rng.choice(len(p), p=p / p.sum()))


def top_entries(lp: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` largest entries (ties: lower id first), values copied from ``lp`` itself."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=lp.dtype)
    if n < lp.shape[0]:
        idx = np.argpartition(-lp, n - 1)[:n]
    else:
        idx = np.arange(lp.shape[0])
    idx = idx[np.lexsort((idx, -lp[idx]))]
    return idx, lp[idx]


class Decoding:
    """One prompt's generation, one token at a time: choice, stop strings, EOS, max_tokens."""

    def __init__(self, work: Work, codec: Codec, eos_ids):
        self.spec = work.gen
        self.codec = codec
        self.eos = eos_ids
        s = self.spec.sampling
        self.rng = np.random.default_rng(s.seed) if s.temperature > 0 else None
        self.stream = TextStream(codec, work.prompt)  # the prompt's tail is decoding context only
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.tops: list[tuple[np.ndarray, np.ndarray]] = []
        self.finish: str | None = None
        self.cut: int | None = None
        self.on_eos = False
        self._longest_stop = max((len(x) for x in self.spec.stop), default=0)

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def last(self) -> int:
        return self.ids[-1]

    def push(self, lp: np.ndarray) -> None:
        tok = choose(lp, self.spec.sampling, self.rng)
        self.ids.append(tok)
        self.lps.append(lp[tok])
        self.tops.append(top_entries(lp, self.spec.top))
        if tok in self.eos:
            self.finish, self.on_eos = "stop", True
            return
        before = len(self.stream.text)
        self.stream.push(tok)
        if self.spec.stop and len(self.stream.text) > before:
            start = max(0, before - self._longest_stop + 1)
            hits = [i for i in (self.stream.text.find(x, start) for x in self.spec.stop) if i >= 0]
            if hits:
                self.finish, self.cut = "stop", min(hits)
                return
        if len(self.ids) >= self.spec.max_tokens:
            self.finish = "length"

    def result(self) -> Generation:
        n = len(self.ids) - (1 if self.on_eos else 0)
        if self.cut is None:
            self.stream.finish()
            text = self.stream.text
        else:
            text = self.stream.text[: self.cut]
        offsets = self.stream.offsets()[:n]
        if self.cut is not None:  # keep the tokens whose text starts before the stop string
            n = sum(1 for o in offsets if o < self.cut)
            offsets = offsets[:n]
        token_text = list(self.stream.pieces[:n])
        ids, lps, tops = self.ids[:n], self.lps[:n], self.tops[:n]
        if self.on_eos:
            ids, lps, tops = self.ids, self.lps, self.tops
            token_text.append(self.codec.token_str(self.ids[-1]))
            offsets.append(len(text))
        return Generation(ids=list(ids), logprobs=list(lps), top_ids=[t[0] for t in tops],
                          top_logprobs=[t[1] for t in tops], token_text=token_text, offsets=offsets, text=text,
                          finish_reason=self.finish or "length", generated=len(self.ids))


class _Job:
    def __init__(self, works: list[Work], future: Future):
        self.works = works
        self.future = future
        self.scored: list = [None] * len(works)
        self.generated: list = [None] * len(works)
        self.quick = all(w.gen is None or w.gen.max_tokens <= 1 for w in works)

    def ready(self) -> bool:
        return all((w.score_top is None or s is not None) and (w.gen is None or g is not None)
                   for w, s, g in zip(self.works, self.scored, self.generated))

    def outcomes(self) -> list[Outcome]:
        return [Outcome(s, g) for s, g in zip(self.scored, self.generated)]


_STOP = object()


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


class Engine:
    def __init__(self, backend, codec: Codec, eos_ids=(), max_batch: int = 32, window: float = 0.002):
        self.backend = backend
        self.codec = codec
        self.eos = frozenset(int(e) for e in eos_ids)
        self.max_batch = max(1, int(max_batch))
        self.window = max(0.0, float(window))
        self.batched_decode = all(hasattr(backend, m) for m in ("decode_start", "decode_step", "decode_keep"))
        self._q: queue.Queue = queue.Queue()
        self._held: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"requests": 0, "sequences": 0, "score_passes": 0, "largest_score_pass": 0,
                      "next_token_passes": 0, "decode_steps": 0, "largest_decode_step": 0, "failed_batches": 0}

    # ------------------------------------------------------------------ outside the engine thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="paddle-scorer-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)

    def submit(self, works: list[Work]) -> Future:
        fut: Future = Future()
        if self._stopping or self._thread is None or not self._thread.is_alive():
            fut.set_exception(EngineStopped("the server is shutting down; the request was not run."))
        else:
            self._q.put(_Job(works, fut))
        return fut

    async def run(self, works: list[Work]) -> list[Outcome]:
        return await asyncio.wrap_future(self.submit(works))

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while not self._stopping:
            jobs = self._collect()
            if jobs:
                self._process(jobs)
        leftover = self._held
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                leftover.append(item)
        for job in leftover:
            if not job.future.done():
                job.future.set_exception(EngineStopped("the server is shutting down; the request was not run."))

    def _collect(self) -> list[_Job]:
        jobs, self._held = self._held, []
        if not jobs:
            item = self._q.get()
            if item is _STOP:
                self._stopping = True
                return []
            jobs = [item]
        n = sum(len(j.works) for j in jobs)
        deadline = time.monotonic() + self.window
        while n < self.max_batch:
            wait = deadline - time.monotonic()
            try:
                item = self._q.get(timeout=wait) if wait > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._stopping = True
                break
            jobs.append(item)
            n += len(item.works)
        return jobs

    def _process(self, jobs: list[_Job]) -> None:
        try:
            self.stats["requests"] += len(jobs)
            self.stats["sequences"] += sum(len(j.works) for j in jobs)
            items = [(job, k, w) for job in jobs for k, w in enumerate(job.works)]
            self._score(items)
            self._one_token(items)
            self._finish_ready(jobs)
            longer = [it for it in items if it[2].gen is not None and it[2].gen.max_tokens > 1]
            longer.sort(key=lambda it: -len(it[2].prompt))
            for chunk in _chunks(longer, self.max_batch):
                self._decode(chunk)
            self._finish_ready(jobs)
        except Exception as exc:  # a failed forward fails its requests, not the server
            self.stats["failed_batches"] += 1
            log.exception("a batch of %d request(s) failed", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)

    def _finish_ready(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if not job.future.done() and job.ready():
                job.future.set_result(job.outcomes())

    def _score(self, items) -> None:
        todo = [it for it in items if it[2].score_top is not None and it[0].scored[it[1]] is None]
        todo.sort(key=lambda it: -len(it[2].prompt))
        for chunk in _chunks(todo, self.max_batch):
            top = max(w.score_top for _, _, w in chunk)
            res = self.backend.sequence_logprobs([w.prompt for _, _, w in chunk], top)
            self.stats["score_passes"] += 1
            self.stats["largest_score_pass"] = max(self.stats["largest_score_pass"], len(chunk))
            for (job, k, w), r in zip(chunk, res, strict=True):
                job.scored[k] = replace(r, top_ids=r.top_ids[:, : w.score_top], top_logprobs=r.top_logprobs[:, : w.score_top])

    def _one_token(self, items) -> None:
        todo = [it for it in items if it[2].gen is not None and it[2].gen.max_tokens == 1 and it[0].generated[it[1]] is None]
        dists: dict[int, np.ndarray] = {}
        need = [i for i, (job, k, _) in enumerate(todo) if job.scored[k] is None]
        for chunk in _chunks(need, self.max_batch):
            lp = self.backend.next_token_logprobs([todo[i][2].prompt for i in chunk])
            self.stats["next_token_passes"] += 1
            for row, i in enumerate(chunk):
                dists[i] = lp[row]
        for i, (job, k, w) in enumerate(todo):
            d = Decoding(w, self.codec, self.eos)
            d.push(dists[i] if i in dists else job.scored[k].next_logprobs)
            job.generated[k] = d.result()

    def _decode(self, chunk) -> None:
        decs = [Decoding(w, self.codec, self.eos) for _, _, w in chunk]

        def finished(i: int) -> None:
            job, k, _ = chunk[i]
            job.generated[k] = decs[i].result()
            self._finish_ready([job])

        if not self.batched_decode:
            for i, (_, _, w) in enumerate(chunk):
                lp, state = self.backend.start(w.prompt)
                while True:
                    decs[i].push(lp)
                    if decs[i].done:
                        break
                    lp, state = self.backend.step(decs[i].last, state)
                    self._count_step(1)
                    self._serve_quick()
                finished(i)
            return
        lp, state = self.backend.decode_start([w.prompt for _, _, w in chunk])
        rows = list(range(len(chunk)))
        while True:
            for r, i in enumerate(rows):
                decs[i].push(lp[r])
                if decs[i].done:
                    finished(i)
            keep = [r for r, i in enumerate(rows) if not decs[i].done]
            if not keep:
                return
            if len(keep) < len(rows):
                state = self.backend.decode_keep(state, keep)
                rows = [rows[r] for r in keep]
            lp, state = self.backend.decode_step([decs[i].last for i in rows], state)
            self._count_step(len(rows))
            self._serve_quick()

    def _count_step(self, n: int) -> None:
        self.stats["decode_steps"] += 1
        self.stats["largest_decode_step"] = max(self.stats["largest_decode_step"], n)

    def _serve_quick(self) -> None:
        """Between decoding steps: serve waiting jobs that need no decoding; hold the others."""
        quick = []
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._stopping = True
                break
            (quick if item.quick else self._held).append(item)
        if quick:
            self._process(quick)
