"""Per-step raw softmax traces of greedy (or seeded sampled) generation.

At every step we record the chosen token, its probability under the model's *raw* softmax (no
temperature, no top-k renormalisation), its log-prob, the entropy of the full distribution and the
top-k tokens. ``renormalize_top_k`` reproduces the old method (top-k renormalised) in a clearly
labelled extra field, for comparison only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np

from paddle_scorer.compute.choose_backend import backend_for
from paddle_scorer.errors import UsageError
from paddle_scorer.tasks.prompts import PromptOptions, Prompter
from paddle_scorer.errors import ScoringError


@dataclass
class GenerateOptions:
    max_new_tokens: int = 20
    top_k: int = 5
    sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    renormalize_top_k: bool = False
    template: str | None = None
    chat_template: bool | None = None
    stop_at_eos: bool = True
    truncate: str = "error"
    coerce_fields: bool = False
    prefix_reuse: bool = True  # a prompt prefix shared with earlier records is not recomputed (same results)
    stop: tuple[str, ...] = ()  # a record finishes when its generated text contains one of these (not output)

    def to_dict(self) -> dict:
        return asdict(self)


def entropy(logprobs: np.ndarray) -> float:
    lp = logprobs.astype(np.float64)
    p = np.exp(lp)
    return float(-(p * np.where(p > 0, lp, 0.0)).sum())


@dataclass
class GenItem:
    id: object
    prompt: str
    context: list[int]
    truncated: int = 0
    fingerprint: str | None = None  # of the input record (resume compares it)


MIN_TEMPERATURE = 1e-3  # sampling temperatures below it overflow log-probs / temperature (serve uses the same floor)


def check_options(options: GenerateOptions) -> None:
    import math

    if options.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1.")
    if options.top_k < 0:
        raise UsageError("--top-k must be 0 or more.")
    if not math.isfinite(options.temperature):
        raise UsageError(f"--temperature must be a finite number, got {options.temperature}.")
    if options.sample and options.temperature < MIN_TEMPERATURE:
        raise UsageError(f"--temperature must be at least {MIN_TEMPERATURE:g} when sampling, got "
                         f"{options.temperature:g} (below it the scaled log-probs overflow; for the most likely "
                         "token drop --sample).")
    if options.seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {options.seed}.")
    if any(not isinstance(s, str) or not s for s in options.stop):
        raise UsageError("--stop must be a non-empty string.")


def prompter_for(tokenizer, options: GenerateOptions, context_length: int | None) -> Prompter:
    return Prompter(tokenizer, PromptOptions(template=options.template, chat_template=options.chat_template,
                                             truncate=options.truncate, coerce_fields=options.coerce_fields),
                    context_length)


class Generator:
    def __init__(self, loaded, options: GenerateOptions, hooks=None):
        check_options(options)
        self.loaded = loaded
        self.tok = loaded.tokenizer
        self.opts = options
        self.hooks = hooks
        self.streamed = loaded.streamed
        if self.streamed:  # past RAM: one pass over the layers per step for every record of a block
            from paddle_scorer.compute.choose_backend import pad_id_of
            from paddle_scorer.compute.streamed import StreamedBackend

            self.pad_id = pad_id_of(self.tok)
            self.stream = StreamedBackend(loaded, self.pad_id, prefix_reuse=False)
            self.stream.no_reuse_reason = "generate past RAM computes each record alone, as in RAM without reuse"
            self.runner = self.stream.decoding_runner()
            self.backend = self.stream
        else:
            self.stream = None
            self.backend = backend_for(loaded, prefix_reuse=options.prefix_reuse)
        self.eos_ids = loaded.eos_ids
        self.max_length = loaded.context_length
        self.prompter = prompter_for(self.tok, options, self.max_length)

    def prepare(self, record: dict, rid, where: str) -> GenItem:
        """The one prompt path; room for at least one new token within the context."""
        text, ids, dropped = self.prompter.prompt_ids(record, where, following=1)
        return GenItem(rid, text, ids, dropped)

    def _piece(self, token_id: int) -> str:
        return self.tok.decode([int(token_id)], skip_special_tokens=False)

    def _step_record(self, lp: np.ndarray, chosen: int) -> dict:
        k = min(self.opts.top_k, lp.shape[0])
        top_idx = np.argsort(-lp, kind="stable")[:k] if k else np.array([], dtype=np.int64)
        rec = {
            "token": self._piece(chosen),
            "token_id": int(chosen),
            "prob": float(np.exp(np.float64(lp[chosen]))),
            "logprob": float(lp[chosen]),
            "entropy": entropy(lp),
            "top": [{"token": self._piece(i), "token_id": int(i), "prob": float(np.exp(np.float64(lp[i]))),
                     "logprob": float(lp[i])} for i in top_idx],
        }
        if self.opts.renormalize_top_k and k:
            p = np.exp(lp[top_idx].astype(np.float64))
            rec["old_method_renormalized_top_k"] = {
                "note": "top-k probabilities renormalised to sum to 1 (the old method): NOT the model's probabilities",
                "probs": [float(x) for x in p / p.sum()],
                "chosen_prob": float(p[list(top_idx).index(chosen)] / p.sum()) if chosen in top_idx else 0.0,
            }
        return rec

    def _take(self, rid, lp: np.ndarray, rng, step: int, run: "_Run") -> bool:
        """Choose the next token of one record from ``lp``, record the step; True when the record is finished."""
        if not np.isfinite(lp).all():
            raise ScoringError(f"record {rid!r}: non-finite probabilities at step {step}; nothing was written for it.")
        if self.opts.sample:
            z = lp.astype(np.float64) / self.opts.temperature
            p = np.exp(z - z.max())
            chosen = int(rng.choice(len(p), p=p / p.sum()))
        else:
            chosen = int(np.argmax(lp))
        run.steps.append(self._step_record(lp, chosen))
        run.out_ids.append(chosen)
        if self.opts.stop_at_eos and chosen in self.eos_ids:
            return True
        if self.opts.stop and any(s in self._text(run.out_ids) for s in self.opts.stop):
            run.stopped = True
            return True
        if len(run.out_ids) >= self.opts.max_new_tokens:
            return True
        return bool(self.max_length and run.prompt_len + len(run.out_ids) >= self.max_length)

    def _text(self, out_ids: list[int]) -> str:
        return self.tok.decode([t for t in out_ids if t not in self.eos_ids], skip_special_tokens=True)

    def _result(self, rid, prompt: str, prompt_ids: list[int], run: "_Run") -> dict:
        text = self._text(run.out_ids)
        reason = "length"
        if run.stopped:
            reason = "stop"
            text = text[: min(text.find(s) for s in self.opts.stop if s in text)]  # the stop string is not output
        elif run.out_ids and run.out_ids[-1] in self.eos_ids:
            reason = "eos"
        return {
            "id": rid,
            "text": text,
            "prompt": prompt,
            "prompt_token_ids": list(prompt_ids),
            "generated_token_ids": run.out_ids,
            "finish_reason": reason,
            "steps": run.steps,
        }

    def generate(self, rid, prompt: str, prompt_ids: list[int]) -> dict:
        if self.streamed:
            return self.generate_block([GenItem(rid, prompt, list(prompt_ids), 0)])[0]
        rng = np.random.default_rng(self.opts.seed)
        run = _Run(len(prompt_ids))
        lp, state = self.backend.start(prompt_ids)
        for i in range(self.opts.max_new_tokens):
            if self._take(rid, lp, rng, i, run):
                break
            lp, state = self.backend.step(run.out_ids[-1], state)
        return self._result(rid, prompt, prompt_ids, run)

    def generate_block(self, items: list) -> list[dict]:
        """Every record of ``items`` generated together: in RAM one after the other; streamed, one pass over the
        layers per step for every unfinished record (their KV caches in RAM), each record computed as in RAM (its
        own shapes, seed and stop)."""
        if not self.streamed:
            return [self.generate(it.id, it.prompt, it.context) for it in items]
        import time

        from paddle_scorer.compute.packing import padded
        from paddle_scorer.process.environment import paddle

        runs = [_Run(len(it.context)) for it in items]
        rngs = [np.random.default_rng(self.opts.seed) for _ in items]
        t0 = self._said = time.perf_counter()
        runner = self.runner
        with paddle().no_grad():
            # each record computed alone, as Backend.start / step compute it in RAM (its own shapes: the same numbers),
            # every layer read once per step for all of them
            self.stream.pass_tokens = sum(len(it.context) for it in items)
            done = runner.hidden_each([(*padded([list(it.context)], self.pad_id), None) for it in items])
            lps = [runner.logprobs(h[:, len(it.context) - 1, :])[0] for (h, _), it in zip(done, items)]
            caches = [cache for _, cache in done]
            active = list(range(len(items)))
            for step in range(self.opts.max_new_tokens):
                active = [i for i in active if not self._take(items[i].id, lps[i], rngs[i], step, runs[i])]
                if not active:
                    break
                self._say_step(step + 1, len(active), len(items), time.perf_counter() - t0)
                calls = []
                for i in active:
                    n = len(items[i].context) + step  # positions so far (the prompt and the tokens fed back)
                    calls.append((np.array([[runs[i].out_ids[-1]]], dtype=np.int64), np.ones((1, n + 1), dtype=np.int64),
                                  np.array([[n]], dtype=np.int64), caches[i]))
                self.stream.pass_tokens = len(calls)  # one token per record: a MoE layer reads only chosen experts
                for i, (h, cache) in zip(active, runner.hidden_each(calls)):
                    lps[i], caches[i] = runner.logprobs(h[:, -1, :])[0], cache
            del caches
        return [self._result(it.id, it.prompt, it.context, run) for it, run in zip(items, runs)]

    def records_per_block(self, items: list) -> int:
        """In RAM: one record at a time. Streamed: as many records as their KV caches allow (every one more shares
        each pass over the weights), or refused with the numbers when even one does not fit."""
        if not self.streamed:
            return 1
        from paddle_scorer.model import memory_budget as mb

        plan = self.loaded.plan.memory
        width = max(len(it.context) for it in items) + self.opts.max_new_tokens
        rows = mb.decode_rows(plan, self.stream.kv_bytes_per_token(), width, len(items))
        if rows < 1:
            per = mb.decode_row_bytes(plan, self.stream.kv_bytes_per_token(), width)
            raise UsageError(
                f"generate past RAM keeps each record's keys and values in RAM: {mb.fmt_bytes(per)} for a record of "
                f"{width} tokens (prompt + --max-new-tokens), but the budget leaves {mb.fmt_bytes(mb.decode_budget(plan))} "
                f"after three layers, the embedding and the head ({mb.fmt_bytes(plan.budget)}, {plan.budget_source}); "
                "shorten the prompts or --max-new-tokens, or raise --memory-limit.")
        return rows

    def streamed_stats(self) -> dict:
        return {"streaming": self.stream.stats.to_dict()} if self.streamed else {}

    def _say_step(self, done: int, active: int, total: int, seconds: float) -> None:
        """Progress within a streamed block (at most every 5 s): the step, the pass time, the projected end."""
        import time

        if self.hooks is None or time.perf_counter() - self._said < 5.0:
            return
        self._said = time.perf_counter()
        per = seconds / done
        left = per * (self.opts.max_new_tokens - done)
        self.hooks.info(f"generate (streamed): step {done}/{self.opts.max_new_tokens} for {active} of {total} record(s) "
                        f"of the block, {per:.1f} s per pass over the layers, at most {left:.0f} s left in this block")


@dataclass
class _Run:
    prompt_len: int
    steps: list = dataclasses.field(default_factory=list)
    out_ids: list = dataclasses.field(default_factory=list)
    stopped: bool = False


# --------------------------------------------------------------------------------------------------
# A whole generate run over a file or prompts: what `paddle-scorer generate` does, callable from Python
# --------------------------------------------------------------------------------------------------


def options_with_defaults(model, lora, *, template=None, raw: bool = False, **options) -> tuple[GenerateOptions, str]:
    """Generate options with the fine-tune's template (scorer.json) unless one is given or ``raw``; returns the options
    and where the template came from. Every check that needs no model is made here."""
    from paddle_scorer.checkpoint.sidecars import scorer_defaults
    from paddle_scorer.tasks.prompts import check_template

    source = "--template" if template is not None else "scorer.json"
    if template is None and not raw:
        template = scorer_defaults(model, lora).get("template")
    check_template(template)
    opts = GenerateOptions(template=template, **options)
    if opts.truncate not in ("error", "left"):
        raise UsageError("--truncate must be error or left.")
    check_options(opts)
    return opts, source


@dataclass
class GenerateRun:
    stats: object  # runs.loop.RunStats
    records: object  # list[dict], or runs.loop.OutputRecords (read from the output file when asked)
    loaded: object


def generate_file(load, opts: GenerateOptions, source, dest, hooks=None, *, template_source: str = "--template",
                  argv: list[str] | None = None) -> GenerateRun:
    """Per-step traces for every record of ``source`` into ``dest`` (resumable, with provenance, the input streamed in
    windows). A model that does not fit the memory budget (or ``--execution streamed``) is generated for layer by
    layer, a block of records at a time, one pass over the layers per step (:meth:`Generator.generate_block`). See
    :func:`paddle_scorer.tasks.classify.classify_file`."""
    import sys

    from paddle_scorer.runs.identity import generate_identity
    from paddle_scorer.runs.loop import Task, execute, index_input
    from paddle_scorer.runs.output_lock import output_held
    from paddle_scorer.tasks.job import Hooks, check_io, check_numbers, template_note
    from paddle_scorer.tasks.loading import check_tokenizer, load_model, plan_for, say_notes

    hooks = hooks or Hooks()
    check_io(source, dest)
    check_numbers(max_new_tokens=opts.max_new_tokens, top_k=opts.top_k)
    check_options(opts)
    template_note(opts.template, template_source, hooks)
    with output_held(dest.output), source.records() as records:
        with hooks.busy("reading the input"):
            indexed = index_input(records, source.id_field)
        loaded = load_model(load, hooks, plan_for(load))
        prompter = prompter_for(loaded.tokenizer, opts, loaded.context_length)
        check_tokenizer(loaded, records, lambda rec, where: [prompter.text(rec, where)], hooks)
        gen = Generator(loaded, opts, hooks)
        say_notes(loaded, hooks)
        # what --resume compares, with the model fingerprint (a hash of every weight file): only for an output
        identity = generate_identity(loaded, opts, use_chat=gen.prompter.use_chat, max_length=gen.max_length,
                                     limit=source.limit, id_field=source.id_field) if dest.output is not None else {}

        def prepare(rows):
            return [gen.prepare(rec, rid, where) for rid, rec, where in rows]

        def score_block(block):
            return gen.generate_block(block)

        task = Task("generate", prepare, score_block, gen.records_per_block)
        outcome = execute(task, records, indexed, output=dest.output, resume=dest.resume, overwrite=dest.overwrite,
                          identity=identity, loaded=loaded, progress=lambda total: hooks.progress("generate", total),
                          meta_extra={"input": str(source.input) if source.input else None,
                                      "argv": sys.argv[1:] if argv is None else argv, "options": opts.to_dict(),
                                      "run_config": identity},
                          finish_extra=lambda: {"prefix_reuse": gen.backend.reuse_stats(), **gen.streamed_stats()})
    outcome.stats.records = outcome.records
    return GenerateRun(outcome.stats, outcome.records, loaded)
