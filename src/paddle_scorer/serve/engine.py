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
    adapter: str | None = None  # which of the served models (None: the only one / the base)
    labels: list[list[int]] | None = None  # /v1/classify: token ids of each label, scored after the prompt
    group: int = 0  # /v1/classify: works of one request and group are scored in one call, as classify does
    on_token: object = None  # streaming: called in the engine thread with the Decoding after each token
    sample: int = 0  # n > 1: which sample of its prompt (its own random stream)


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
    labels: list | None = None  # /v1/classify: one ContinuationScore per label
    cached: int = 0  # prompt tokens a prefix computed by an earlier request supplied


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
        seed = s.seed if (s.seed is None or work.sample == 0) else [s.seed, work.sample]
        self.rng = np.random.default_rng(seed) if s.temperature > 0 else None
        self.work = work
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
        self._push(lp)
        if self.work.on_token is not None:
            self.work.on_token("token", self)

    def partial(self) -> Generation:
        """What is generated so far (the text not cut by a stop string yet; tokens still waiting for their text
        have an empty piece): for streaming the settled tokens, whose pieces are final."""
        return Generation(ids=list(self.ids), logprobs=list(self.lps), top_ids=[t[0] for t in self.tops],
                          top_logprobs=[t[1] for t in self.tops], token_text=list(self.stream.pieces),
                          offsets=self.stream.offsets(), text=self.stream.text, finish_reason=None,
                          generated=len(self.ids))

    def settled(self) -> int:
        """Tokens whose text and log-prob are final (what a stream may send): the ones before any token still
        waiting for its text (an incomplete character), and before the last ``longest stop - 1`` characters
        that a stop string could still cut (all of them once the generation is done)."""
        if self.done:
            return len(self.result().ids)
        n = len(self.ids) - len(self.stream._pending)
        if self._longest_stop > 1:
            safe = len(self.stream.text) - (self._longest_stop - 1)
            offsets = self.stream.offsets()
            while n > 0 and offsets[n - 1] + len(self.stream.pieces[n - 1]) > safe:
                n -= 1
        return n

    def _push(self, lp: np.ndarray) -> None:
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
        if self.done and getattr(self, "_result", None) is not None:
            return self._result
        g = self._make_result()
        if self.done:
            self._result = g
        return g

    def _make_result(self) -> Generation:
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


class Cancelled(Exception):
    """The client went away: the rest of its request was not computed."""


class _Job:
    def __init__(self, works: list[Work], future: Future):
        self.works = works
        self.future = future
        self.scored: list = [None] * len(works)
        self.generated: list = [None] * len(works)
        self.labelled: list = [None] * len(works)
        self.cached = [0] * len(works)
        self.quick = all(w.gen is None or w.gen.max_tokens <= 1 for w in works)
        self.light = self.quick and all(w.labels is None for w in works)  # one forward at most: never made to wait
        self.cancelled = False

    def ready(self) -> bool:
        return all((w.score_top is None or s is not None) and (w.gen is None or g is not None)
                   and (w.labels is None or lab is not None)
                   for w, s, g, lab in zip(self.works, self.scored, self.generated, self.labelled))

    def outcomes(self) -> list[Outcome]:
        return [Outcome(s, g, lab, c) for s, g, lab, c in zip(self.scored, self.generated, self.labelled, self.cached)]


_STOP = object()


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


class Engine:
    """The model thread. ``backends``: one backend, or ``{model name: backend}`` when several adapters share one
    base (each job's works name theirs; works of different adapters never share a forward)."""

    def __init__(self, backends, codec: Codec, eos_ids=(), max_batch: int = 32, window: float = 0.002):
        self.backends = backends if isinstance(backends, dict) else {None: backends}
        self.default = next(iter(self.backends))
        self.codec = codec
        self.eos = frozenset(int(e) for e in eos_ids)
        self.max_batch = max(1, int(max_batch))
        self.window = max(0.0, float(window))
        self.batched_decode = all(hasattr(b, m) for b in self.backends.values()
                                  for m in ("decode_start", "decode_step", "decode_keep"))
        self._q: queue.Queue = queue.Queue()
        self._held: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"requests": 0, "sequences": 0, "score_passes": 0, "largest_score_pass": 0,
                      "next_token_passes": 0, "decode_steps": 0, "largest_decode_step": 0, "failed_batches": 0,
                      "failed_requests": 0, "cancelled_requests": 0, "label_passes": 0}

    @property
    def backend(self):
        return self.backends[self.default]

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
            job = _Job(works, fut)
            fut.job = job  # for cancel()
            self._q.put(job)
        return fut

    def cancel(self, fut: Future) -> None:
        """The client left: the job's remaining work is skipped (decoding rows dropped at the next step)."""
        job = getattr(fut, "job", None)
        if job is not None and not fut.done():
            job.cancelled = True

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

    def _drop_cancelled(self, jobs: list[_Job]) -> list[_Job]:
        live = []
        for job in jobs:
            if job.cancelled:
                if not job.future.done():
                    self.stats["cancelled_requests"] += 1
                    job.future.set_exception(Cancelled("the client went away; the request was not completed."))
            else:
                live.append(job)
        return live

    def _process(self, jobs: list[_Job]) -> None:
        """Run the jobs together; if that fails, each job alone, so that one request's failure (a value that
        breaks a forward) fails that request only."""
        jobs = self._drop_cancelled(jobs)
        if not jobs:
            return
        self.stats["requests"] += len(jobs)
        self.stats["sequences"] += sum(len(j.works) for j in jobs)
        try:
            self._compute(jobs)
        except Exception as exc:
            self.stats["failed_batches"] += 1
            if len(jobs) == 1:
                self._fail(jobs[0], exc)
                return
            log.warning("a batch of %d requests failed (%s: %s); running each alone", len(jobs), type(exc).__name__, exc)
            for job in jobs:
                if job.future.done():
                    continue
                try:
                    self._compute([job])
                except Exception as exc1:  # this request's own failure
                    self._fail(job, exc1)

    def _fail(self, job: _Job, exc: Exception) -> None:
        self.stats["failed_requests"] += 1
        if not isinstance(exc, (Cancelled, FloatingPointError)):
            log.error("a request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        if not job.future.done():
            job.future.set_exception(exc)

    def _compute(self, jobs: list[_Job]) -> None:
        items = [(job, k, w) for job in jobs for k, w in enumerate(job.works)]
        by_adapter: dict = {}
        for it in items:
            by_adapter.setdefault(it[2].adapter if it[2].adapter in self.backends else self.default, []).append(it)
        for adapter, group in by_adapter.items():  # the light work first: a 1-token completion never waits for
            backend = self.backends[adapter]         # a batch of 1,024-label classify requests
            self._score(backend, group)
            self._one_token(backend, group)
        self._finish_ready(jobs)
        for adapter, group in by_adapter.items():
            self._labels(self.backends[adapter], group, jobs)
        self._finish_ready(jobs)
        for adapter, group in by_adapter.items():
            backend = self.backends[adapter]
            longer = [it for it in group if it[2].gen is not None and it[2].gen.max_tokens > 1
                      and it[0].generated[it[1]] is None]
            longer.sort(key=lambda it: -len(it[2].prompt))
            for chunk in _chunks(longer, self.max_batch):
                self._decode(backend, chunk)
        self._finish_ready(jobs)

    def _finish_ready(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if not job.future.done() and job.ready():
                job.future.set_result(job.outcomes())

    def _labels(self, backend, items, jobs) -> None:
        """Label scores, one call per request and group (the same batches, hence the same numbers, as classify); each
        request answered as soon as its own groups are done, and light requests that arrive meanwhile served between
        groups (8 clients' 1,024-label requests made a 1-token completion wait 2.4 s)."""
        todo = [it for it in items if it[2].labels is not None and it[0].labelled[it[1]] is None
                and not it[0].cancelled]
        groups: dict = {}
        for it in todo:
            groups.setdefault((id(it[0]), it[2].group), []).append(it)
        for part in groups.values():
            if part[0][0].cancelled:
                continue
            res = backend.score_many([([w.prompt for _, _, w in part], [w.labels for _, _, w in part])])[0]
            self.stats["label_passes"] += 1
            for (job, k, _), r in zip(part, res, strict=True):
                job.labelled[k] = r
            self._finish_ready(jobs)
            self._serve_light()

    def _score(self, backend, items) -> None:
        todo = [it for it in items if it[2].score_top is not None and it[0].scored[it[1]] is None
                and not it[0].cancelled]
        todo.sort(key=lambda it: -len(it[2].prompt))
        cached_fn = getattr(backend, "sequence_logprobs_cached", None)
        for chunk in _chunks(todo, self.max_batch):
            top = max(w.score_top for _, _, w in chunk)
            seqs = [w.prompt for _, _, w in chunk]
            res, cached = cached_fn(seqs, top) if cached_fn else (backend.sequence_logprobs(seqs, top), [0] * len(seqs))
            self.stats["score_passes"] += 1
            self.stats["largest_score_pass"] = max(self.stats["largest_score_pass"], len(chunk))
            for (job, k, w), r, c in zip(chunk, res, cached, strict=True):
                job.scored[k] = replace(r, top_ids=r.top_ids[:, : w.score_top], top_logprobs=r.top_logprobs[:, : w.score_top])
                job.cached[k] = max(job.cached[k], c)
                if w.on_token is not None:
                    w.on_token("scored", job.scored[k])

    def _one_token(self, backend, items) -> None:
        todo = [it for it in items if it[2].gen is not None and it[2].gen.max_tokens == 1
                and it[0].generated[it[1]] is None and not it[0].cancelled]
        dists: dict[int, np.ndarray] = {}
        need = [i for i, (job, k, _) in enumerate(todo) if job.scored[k] is None]
        for chunk in _chunks(need, self.max_batch):
            lp = backend.next_token_logprobs([todo[i][2].prompt for i in chunk])
            self.stats["next_token_passes"] += 1
            for row, i in enumerate(chunk):
                dists[i] = lp[row]
        for i, (job, k, w) in enumerate(todo):
            d = Decoding(w, self.codec, self.eos)
            d.push(dists[i] if i in dists else job.scored[k].next_logprobs)
            job.generated[k] = d.result()

    def _decode(self, backend, chunk) -> None:
        decs = [Decoding(w, self.codec, self.eos) for _, _, w in chunk]

        def finished(i: int) -> None:
            job, k, _ = chunk[i]
            job.generated[k] = decs[i].result()
            self._finish_ready([job])

        def gone(i: int) -> bool:
            job = chunk[i][0]
            if job.cancelled:
                self._drop_cancelled([job])
            return job.cancelled

        if not self.batched_decode:
            for i, (_, _, w) in enumerate(chunk):
                if gone(i):
                    continue
                lp, state = backend.start(w.prompt)
                while True:
                    decs[i].push(lp)
                    if decs[i].done or gone(i):
                        break
                    lp, state = backend.step(decs[i].last, state)
                    self._count_step(1)
                    self._serve_quick()
                if not gone(i):
                    finished(i)
            return
        rows = [i for i in range(len(chunk)) if not gone(i)]
        if not rows:
            return
        lp, state = backend.decode_start([chunk[i][2].prompt for i in rows])
        cached = getattr(backend, "last_start_cached", 0)
        for i in rows:
            chunk[i][0].cached[chunk[i][1]] = max(chunk[i][0].cached[chunk[i][1]], cached)
        while True:
            for r, i in enumerate(rows):
                decs[i].push(lp[r])
                if decs[i].done:
                    finished(i)
            keep = [r for r, i in enumerate(rows) if not decs[i].done and not gone(i)]
            if not keep:
                return
            if len(keep) < len(rows):
                state = backend.decode_keep(state, keep)
                rows = [rows[r] for r in keep]
            lp, state = backend.decode_step([decs[i].last for i in rows], state)
            self._count_step(len(rows))
            self._serve_quick()

    def _count_step(self, n: int) -> None:
        self.stats["decode_steps"] += 1
        self.stats["largest_decode_step"] = max(self.stats["largest_decode_step"], n)

    def _serve_light(self) -> None:
        """Between label groups: serve waiting jobs that need one forward at most; hold the others."""
        self._serve_waiting(lambda job: job.light)

    def _serve_quick(self) -> None:
        """Between decoding steps: serve waiting jobs that need no decoding; hold the others."""
        self._serve_waiting(lambda job: job.quick)

    def _serve_waiting(self, now) -> None:
        picked = []
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._stopping = True
                break
            (picked if now(item) else self._held).append(item)
        if picked:
            self._process(picked)
