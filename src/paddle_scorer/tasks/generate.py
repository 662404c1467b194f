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


def prompter_for(tokenizer, options: GenerateOptions, context_length: int | None) -> Prompter:
    return Prompter(tokenizer, PromptOptions(template=options.template, chat_template=options.chat_template,
                                             truncate=options.truncate, coerce_fields=options.coerce_fields),
                    context_length)


class Generator:
    def __init__(self, loaded, options: GenerateOptions):
        check_options(options)
        self.loaded = loaded
        self.tok = loaded.tokenizer
        self.opts = options
        if loaded.streamed:
            raise UsageError("generate needs the whole model in memory (a layer-streamed model would be re-read for every "
                             "token); use a machine or GPU that fits it, or classify, which streams.")
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

    def generate(self, rid, prompt: str, prompt_ids: list[int]) -> dict:
        rng = np.random.default_rng(self.opts.seed)
        lp, state = self.backend.start(prompt_ids)
        steps, out_ids = [], []
        for i in range(self.opts.max_new_tokens):
            if not np.isfinite(lp).all():
                raise ScoringError(f"record {rid!r}: non-finite probabilities at step {i}; nothing was written for it.")
            if self.opts.sample:
                z = lp.astype(np.float64) / self.opts.temperature
                p = np.exp(z - z.max())
                chosen = int(rng.choice(len(p), p=p / p.sum()))
            else:
                chosen = int(np.argmax(lp))
            steps.append(self._step_record(lp, chosen))
            out_ids.append(chosen)
            if self.opts.stop_at_eos and chosen in self.eos_ids:
                break
            if i + 1 == self.opts.max_new_tokens:
                break
            if self.max_length and len(prompt_ids) + len(out_ids) >= self.max_length:
                break
            lp, state = self.backend.step(chosen, state)
        text_ids = [t for t in out_ids if t not in self.eos_ids]
        return {
            "id": rid,
            "text": self.tok.decode(text_ids, skip_special_tokens=True),
            "prompt": prompt,
            "prompt_token_ids": list(prompt_ids),
            "generated_token_ids": out_ids,
            "finish_reason": "eos" if out_ids and out_ids[-1] in self.eos_ids else "length",
            "steps": steps,
        }


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
    windows), the whole model in memory (a model that does not fit is refused before loading). See
    :func:`paddle_scorer.tasks.classify.classify_file`."""
    import sys

    from paddle_scorer.runs.identity import generate_identity
    from paddle_scorer.runs.loop import Task, execute, index_input
    from paddle_scorer.runs.output_lock import output_held
    from paddle_scorer.tasks.job import Hooks, check_io, check_numbers, template_note
    from paddle_scorer.tasks.loading import check_tokenizer, load_model, plan_in_ram, say_notes

    hooks = hooks or Hooks()
    check_io(source, dest)
    check_numbers(max_new_tokens=opts.max_new_tokens, top_k=opts.top_k)
    check_options(opts)
    template_note(opts.template, template_source, hooks)
    with output_held(dest.output), source.records() as records:
        with hooks.busy("reading the input"):
            indexed = index_input(records, source.id_field)
        load = dataclasses.replace(load, execution="in-ram")
        loaded = load_model(load, hooks, plan_in_ram(load, "generate"))
        prompter = prompter_for(loaded.tokenizer, opts, loaded.context_length)
        check_tokenizer(loaded, records, lambda rec, where: [prompter.text(rec, where)], hooks)
        gen = Generator(loaded, opts)
        say_notes(loaded, hooks)
        # what --resume compares, with the model fingerprint (a hash of every weight file): only for an output
        identity = generate_identity(loaded, opts, use_chat=gen.prompter.use_chat, max_length=gen.max_length,
                                     limit=source.limit, id_field=source.id_field) if dest.output is not None else {}

        def prepare(rows):
            return [gen.prepare(rec, rid, where) for rid, rec, where in rows]

        def score_block(block):
            return [gen.generate(it.id, it.prompt, it.context) for it in block]

        task = Task("generate", prepare, score_block, lambda _items: 1)
        outcome = execute(task, records, indexed, output=dest.output, resume=dest.resume, overwrite=dest.overwrite,
                          identity=identity, loaded=loaded, progress=lambda total: hooks.progress("generate", total),
                          meta_extra={"input": str(source.input) if source.input else None,
                                      "argv": sys.argv[1:] if argv is None else argv, "options": opts.to_dict(),
                                      "run_config": identity},
                          finish_extra=lambda: {"prefix_reuse": gen.backend.reuse_stats()})
    outcome.stats.records = outcome.records
    return GenerateRun(outcome.stats, outcome.records, loaded)
