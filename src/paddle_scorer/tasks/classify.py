"""Exact label probabilities: log P(label | prompt) by teacher forcing, normalised over the labels.

``Classifier(loaded, options)`` turns records into output dicts. Everything that can be wrong with
the input (template fields, labels, lengths) is checked in :meth:`Classifier.prepare`, before any
forward pass, so bad input never leaves a partial output behind.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from paddle_scorer.compute import packing
from paddle_scorer.compute.choose_backend import backend_for
from paddle_scorer.errors import ScoringError, UsageError
from paddle_scorer.tasks.prompts import PromptOptions, Prompter, check_template, resolve_prefix, template_fields

LENGTH_NORMS = ("none", "per-token")
CALIBRATIONS = ("none", "contextual", "pmi")
DEFAULT_CONTENT_FREE = ("N/A", "", "[MASK]")


@dataclass
class ClassifyOptions:
    labels: list[str]
    template: str | None = None
    label_prefix: str = " "
    chat_template: bool | None = None  # None: on when the tokenizer has one
    length_norm: str = "none"
    calibration: str = "none"
    content_free: list[str] = field(default_factory=lambda: list(DEFAULT_CONTENT_FREE))
    pmi_domain: str | None = None
    batch_size: int | None = None  # None: length-sorted batches of up to packing.CALL_TOKENS padded tokens
    max_length: int | None = None
    truncate: str = "error"  # error | left
    gold_field: str = "label"
    coerce_fields: bool = False
    force_max_length: bool = False
    prefix_reuse: bool = True  # compute shared prompt prefixes once (not in the identity: results are equal)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    """One record, ready for the model: its prompt ids and, per label, the label ids."""

    id: object
    prompt: str
    context: list[int]
    label_ids: list[list[int]]
    gold: object = None
    truncated: int = 0
    fingerprint: str | None = None  # of the input record (resume compares it)


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x)
    e = np.exp(z)
    return e / e.sum()


def check_gold_not_in_template(options: "ClassifyOptions") -> None:
    """A template that fills in the gold label field would put each record's answer into its prompt: the
    scores would look excellent and mean nothing. Refused; the way out names the real gold field."""
    if options.template and options.gold_field and options.gold_field in template_fields(options.template):
        raise UsageError(
            f"the template fills in {{{options.gold_field}}}, the gold label field (--gold-field), so every prompt "
            "would contain its own answer; remove it from the template, or name the real gold field with "
            "--gold-field."
        )


def check_options(opts: "ClassifyOptions") -> None:
    """Every check of classify's options that needs no model: the CLI calls it before loading anything, and the
    Python API through :class:`LabelEncoder` (so ``Classifier`` and ``smoke`` get the same sentences)."""
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UsageError("--batch-size must be at least 1.")
    if opts.length_norm not in LENGTH_NORMS:
        raise UsageError(f"--length-norm {opts.length_norm!r} is not one of {', '.join(LENGTH_NORMS)}.")
    if opts.calibration not in CALIBRATIONS:
        raise UsageError(f"--calibration {opts.calibration!r} is not one of {', '.join(CALIBRATIONS)}.")
    if opts.truncate not in ("error", "left"):
        raise UsageError(f"--truncate {opts.truncate!r} must be error or left.")
    if opts.calibration == "contextual" and not opts.content_free:
        raise UsageError("--calibration contextual needs at least one content-free input (--content-free TEXT; the "
                         "default is N/A, '' and [MASK]).")
    check_template(opts.template)
    check_gold_not_in_template(opts)


class LabelEncoder:
    """Records -> :class:`Prepared` (prompt ids and label ids), without the model: the prompt path
    (:class:`~paddle_scorer.tasks.prompts.Prompter`) plus the prompt/label boundary. ``smoke`` runs it over every
    record before loading anything."""

    def __init__(self, tokenizer, options: "ClassifyOptions", context_length: int | None):
        check_options(options)
        self.tok = tokenizer
        self.opts = options
        self.prompter = Prompter(tokenizer, PromptOptions(
            template=options.template, chat_template=options.chat_template, max_length=options.max_length,
            truncate=options.truncate, coerce_fields=options.coerce_fields, force_max_length=options.force_max_length,
        ), context_length)
        self.use_chat = self.prompter.use_chat
        self.special = self.prompter.special
        self.max_length = self.prompter.max_length
        self.encoder = self.prompter.encoder

    def prompt_text(self, record: dict, where: str) -> str:
        return self.prompter.text(record, where)

    def encode(self, prompt: str, where: str, rid=None, gold=None) -> Prepared:
        return self.encode_many([(prompt, where, rid, gold)])[0]

    def encode_many(self, items: list[tuple]) -> list[Prepared]:
        """``[(prompt, where, id, gold)]`` -> :class:`Prepared`, the tokenizer called twice for all of them (two
        batches: every prompt, and every prompt + label). The boundary rule is lm-eval's (see
        :func:`~paddle_scorer.tasks.prompts.encode_pair`): prompt and label encoded together, split at the prompt's
        own length, the prompt's trailing whitespace moved into the label."""
        labels = self.opts.labels
        stripped, wholes = [], []
        for prompt, *_ in items:
            base = prompt.rstrip()
            tail = prompt[len(base):] + resolve_prefix(self.opts.label_prefix, prompt)
            stripped.append(base)
            wholes += [base + tail + label for label in labels]
        contexts = self.encoder.many(stripped, self.special)
        encoded = self.encoder.many(wholes, self.special)
        n = len(labels)
        return [self._split(item, len(contexts[k]), encoded[k * n:(k + 1) * n]) for k, item in enumerate(items)]

    def _split(self, item: tuple, ctx_len: int, wholes: list[list[int]]) -> Prepared:
        prompt, where, rid, gold = item
        contexts, label_ids = [w[:ctx_len] for w in wholes], [w[ctx_len:] for w in wholes]
        for label, ids in zip(self.opts.labels, label_ids):
            if not ids:
                raise UsageError(f"label {label!r} tokenizes to nothing after this prompt ({where}); choose another label text.")
        context = contexts[0]
        if any(c != context for c in contexts):
            # A label's first characters merged with the prompt's last token: keep the honest split
            # by scoring from the shortest common context and moving the rest into the label.
            n = min(len(c) for c in contexts)
            while any(c[:n] != context[:n] for c in contexts):
                n -= 1
            label_ids = [c[n:] + lab for c, lab in zip(contexts, label_ids)]
            context = context[:n]
        seen: dict[tuple, str] = {}
        for label, ids in zip(self.opts.labels, label_ids):
            if tuple(ids) in seen:  # e.g. "café" precomposed and decomposed, after the tokenizer's normalisation
                raise UsageError(
                    f"{where}: labels {ascii(seen[tuple(ids)])} and {ascii(label)} become the same tokens {ids} after "
                    "this prompt, so the model cannot tell them apart (each would get an equal share); use labels "
                    "that differ after the tokenizer's normalisation."
                )
            seen[tuple(ids)] = label
        context, truncated = self.prompter.fit(context, where, following=max(len(x) for x in label_ids) - 1)
        return Prepared(rid, prompt, context, label_ids, None if gold is None else gold, truncated)

    def prepare_many(self, rows) -> list[Prepared]:
        """``[(id, record, where)]`` -> :class:`Prepared` (see :meth:`encode_many`)."""
        items = []
        for rid, rec, where in rows:
            gold = self.gold(rec, where)
            items.append((self.prompt_text(rec, where), where, rid, gold))
        return self.encode_many(items)

    def gold(self, record: dict, where: str):
        gold = record.get(self.opts.gold_field)
        if gold is not None and (isinstance(gold, (bool, list, dict)) or
                                 (isinstance(gold, float) and not math.isfinite(gold))):
            raise UsageError(f"{where}: the gold label field {self.opts.gold_field!r} is {json.dumps(gold)[:40]}, not a "
                             "label; give it as text (or a number), or null for no gold label.")
        return gold

    def prepare(self, record: dict, rid, where: str) -> Prepared:
        return self.prepare_many([(rid, record, where)])[0]


class Classifier:
    """``backend``: the scoring backend to use (default: one for ``loaded``); ``serve`` passes ``None`` with
    ``score=False`` and runs the forwards in its engine thread (:meth:`calibration_preps`, :meth:`set_calibration`,
    :meth:`record`)."""

    def __init__(self, loaded, options: ClassifyOptions, score: bool = True):
        self.loaded = loaded
        self.tok = loaded.tokenizer
        self.opts = options
        self.encoder = LabelEncoder(loaded.tokenizer, options, loaded.context_length)
        self.use_chat = self.encoder.use_chat
        self.max_length = self.encoder.max_length
        self.backend = backend_for(loaded, prefix_reuse=options.prefix_reuse) if score else None
        self.calibration_info: dict = {"method": options.calibration}
        self._cf_probs: np.ndarray | None = None
        self._domain_scores: np.ndarray | None = None

    # ------------------------------------------------------------------ preparation (no model)

    def prompt_text(self, record: dict, where: str) -> str:
        return self.encoder.prompt_text(record, where)

    def encode(self, prompt: str, where: str, rid=None, gold=None) -> Prepared:
        return self.encoder.encode(prompt, where, rid, gold)

    def prepare(self, record: dict, rid, where: str) -> Prepared:
        return self.encoder.prepare(record, rid, where)

    def prepare_many(self, rows) -> list[Prepared]:
        return self.encoder.prepare_many(rows)

    # ------------------------------------------------------------------ calibration

    def calibrate(self) -> dict:
        """Compute what the chosen calibration needs (once, before the data). Returns its record."""
        preps = self.calibration_preps()
        return self.set_calibration(self._score_prepared(preps) if preps else [])

    def calibration_preps(self) -> list[Prepared]:
        """The inputs the chosen calibration scores: the content-free inputs (contextual), the domain premise (pmi)."""
        method = self.opts.calibration
        if method == "contextual":
            fields = template_fields(self.opts.template) if self.opts.template else ["query"]
            preps = []
            for cf in self.opts.content_free:
                record = {f: cf for f in fields}
                preps.append(self.encode(self.prompt_text(record, f"content-free input {cf!r}"),
                                         f"content-free input {cf!r}"))
            return preps
        if method == "pmi":
            domain = self.pmi_domain()
            return [self.encode(domain, "the PMI domain premise")]
        return []

    def pmi_domain(self) -> str:
        domain = self.opts.pmi_domain if self.opts.pmi_domain is not None else self.default_domain()
        if not domain:
            raise UsageError("--calibration pmi needs a domain premise (the text just before the answer); pass --pmi-domain TEXT.")
        return domain

    def set_calibration(self, results: list) -> dict:
        """The calibration constants from the scored :meth:`calibration_preps` (``(None, [ContinuationScore])`` each)."""
        method = self.opts.calibration
        if method == "contextual":
            raw = [self._label_scores(r) for r in results]
            probs = np.mean([softmax(s) for s in raw], axis=0)
            self._cf_probs = probs
            self.calibration_info = {"method": method, "content_free": list(self.opts.content_free),
                                     "content_free_probs": dict(zip(self.opts.labels, map(float, probs)))}
        elif method == "pmi":
            result = results[0]
            lp = np.array([s.logprob for s in result[1]])
            self._domain_scores = self._label_scores(result)  # same length normalisation as the records'
            self.calibration_info = {"method": method, "domain_premise": self.pmi_domain(),
                                     "domain_logprobs": dict(zip(self.opts.labels, map(float, lp)))}
        return self.calibration_info

    def default_domain(self) -> str | None:
        """Holtzman et al.'s domain premise: the template text after its last placeholder."""
        t = self.opts.template
        if not t or "}" not in t:
            return None
        tail = t[t.rfind("}") + 1:]
        return tail.strip() and tail.lstrip()

    # ------------------------------------------------------------------ scoring

    def _score_prepared(self, preps: list[Prepared]):
        """Run the backend over prepared records, batched by length; results in input order."""
        out: list = [None] * len(preps)
        order = sorted(range(len(preps)), key=lambda i: len(preps[i].context), reverse=True)
        bs = self.opts.batch_size
        if bs is None:  # by tokens: a few long prompts or many short ones per forward
            cut = packing.regroup([(preps[i].context, preps[i].label_ids) for i in order], packing.CALL_TOKENS)
            groups = [[order[k] for k in g] for g in cut]
        else:
            groups = [order[start:start + bs] for start in range(0, len(order), bs)]
        results = self.backend.score_many([([preps[i].context for i in idx], [preps[i].label_ids for i in idx])
                                           for idx in groups])
        for idx, res in zip(groups, results, strict=True):
            for k, i in enumerate(idx):
                out[i] = (None, res[k])
        return out

    def records_per_flush(self, preps: list[Prepared]) -> int:
        """Records scored between two flushes of the output (what ``--resume`` can lose to a kill): the
        batch size when one is given, else about four default batches of these records' mean length."""
        if self.opts.batch_size is not None:
            return self.opts.batch_size
        mean = sum(len(p.context) + sum(len(x) - 1 for x in p.label_ids) for p in preps) / max(1, len(preps))
        return int(min(256, max(8, 4 * packing.CALL_TOKENS // max(1, mean))))

    def _label_scores(self, result) -> np.ndarray:
        _, conts = result
        lp = np.array([c.logprob for c in conts], dtype=np.float64)
        if self.opts.length_norm == "per-token":
            lp = lp / np.array([len(c.token_logprobs) for c in conts])
        return lp

    def score(self, preps: list[Prepared]) -> list[dict]:
        """Output records for prepared inputs, in the given order."""
        records = []
        for prep, result in zip(preps, self._score_prepared(preps), strict=True):
            records.append(self._record(prep, result))
        return records

    def record(self, prep: Prepared, conts: list) -> dict:
        """The output record of one prepared input from its label scores (one ContinuationScore per label)."""
        return self._record(prep, (None, conts))

    def _record(self, prep: Prepared, result) -> dict:
        _, conts = result
        labels = self.opts.labels
        raw_lp = np.array([c.logprob for c in conts], dtype=np.float64)
        if not np.isfinite(raw_lp).all():
            bad = [lab for lab, v in zip(labels, raw_lp) if not np.isfinite(v)]
            raise ScoringError(
                f"record {prep.id!r}: the model gave non-finite log-probabilities for {', '.join(bad)}; it was not "
                "written (a NaN is never a score): check the weights with `paddle-scorer smoke`."
            )
        scores = self._label_scores(result)
        raw_probs = softmax(scores)
        if self.opts.calibration == "contextual":
            probs = raw_probs / self._cf_probs
            probs = probs / probs.sum()
        elif self.opts.calibration == "pmi":
            probs = softmax(scores - self._domain_scores)
        else:
            probs = raw_probs
        pred = labels[int(np.argmax(probs))]
        rec = {
            "id": prep.id,
            "prediction": pred,
            "probs": {lab: float(p) for lab, p in zip(labels, probs)},
            "logprobs": {lab: float(v) for lab, v in zip(labels, raw_lp)},
            "label_token_ids": {lab: ids for lab, ids in zip(labels, prep.label_ids)},
            "label_num_tokens": {lab: len(ids) for lab, ids in zip(labels, prep.label_ids)},
            "is_greedy": {lab: bool(c.greedy) for lab, c in zip(labels, conts)},
            "prompt_token_ids": prep.context,
        }
        if self.opts.calibration != "none":
            rec["uncalibrated_probs"] = {lab: float(p) for lab, p in zip(labels, raw_probs)}
        if prep.gold is not None:
            rec["gold"] = prep.gold
        if prep.truncated:
            rec["truncated_tokens"] = prep.truncated
        return rec



# --------------------------------------------------------------------------------------------------
# A whole classify run over a file or prompts: what `paddle-scorer classify` does, callable from Python
# --------------------------------------------------------------------------------------------------


def options_with_defaults(model, lora, *, labels=None, template=None, label_prefix=None,
                          **options) -> tuple[ClassifyOptions, str]:
    """Classify options with the fine-tune's defaults (scorer.json of the adapter, else the model) for what is not
    given: labels (a comma-separated string or a list), template, label prefix. Returns the options and where the
    template came from (``--template`` or ``scorer.json``). Every check that needs no model is made here."""
    from paddle_scorer.checkpoint.sidecars import scorer_defaults
    from paddle_scorer.tasks.prompts import parse_labels

    defaults = scorer_defaults(model, lora)
    prefix = label_prefix if label_prefix is not None else defaults.get("label_prefix", " ")
    if options.get("content_free") is None:
        options["content_free"] = list(DEFAULT_CONTENT_FREE)
    opts = ClassifyOptions(labels=parse_labels(labels if labels is not None else defaults.get("labels"), prefix),
                           template=template if template is not None else defaults.get("template"),
                           label_prefix=prefix, **options)
    check_options(opts)
    return opts, "--template" if template is not None else "scorer.json"


@dataclass
class ClassifyRun:
    """What a classify run did: its records (a list without ``--output``; with one, a view that reads them from the
    output file when asked, so a million-record run is not held in memory), the metrics, the calibration, the loaded
    model's facts, and the output written (None: nothing, or only a launcher worker's part)."""

    stats: object  # runs.loop.RunStats
    records: object  # list[dict] or runs.loop.OutputRecords
    metrics: dict | None
    calibration: dict
    loaded: object
    outcome: object  # runs.loop.Outcome (worker, assembled, part)
    written: object = None  # the output path, when the whole output was written

    @property
    def part_only(self) -> bool:
        """A launcher worker that wrote its part while another assembles the output."""
        return self.outcome.worker.distributed and not self.outcome.assembled


def classify_file(load, opts: ClassifyOptions, source, dest, hooks=None, *, stream_block_records: int | None = None,
                  template_source: str = "--template", argv: list[str] | None = None) -> ClassifyRun:
    """Score every record of ``source`` (a :class:`~paddle_scorer.tasks.job.Source`) with the model of ``load`` (a
    :class:`~paddle_scorer.tasks.loading.LoadOptions`) into ``dest`` (a :class:`~paddle_scorer.tasks.job.Destination`):
    resumable, with provenance, single-process or as one ``paddle.distributed.launch`` worker, streaming the input in
    windows (:mod:`paddle_scorer.runs.loop`). Every line of the input is checked before the model is loaded; a
    record that cannot be prepared stops the run at its window with everything before it kept. What the CLI prints
    comes through ``hooks``."""
    from paddle_scorer.runs.loop import index_input
    from paddle_scorer.runs.output_lock import output_held
    from paddle_scorer.tasks.job import Hooks, check_io, check_numbers, template_note
    from paddle_scorer.tasks.loading import load_model, say_notes

    hooks = hooks or Hooks()
    check_io(source, dest)
    check_numbers(batch_size=opts.batch_size, max_length=opts.max_length, stream_block_records=stream_block_records)
    check_options(opts)
    template_note(opts.template, template_source, hooks)
    with output_held(dest.output), source.records() as records:
        with hooks.busy("reading the input"):
            indexed = index_input(records, source.id_field)
        loaded = load_model(load, hooks)
        _check_tokenizer(loaded, opts, records, hooks)
        clf = Classifier(loaded, opts)
        say_notes(loaded, hooks)
        calib = clf.calibrate()
        return _run(clf, calib, records, indexed, source, dest, hooks, stream_block_records, argv)


def _check_tokenizer(loaded, opts: ClassifyOptions, records, hooks) -> None:
    """The fast tokenizer against the slow one on what the run encodes first: prompts, and prompts with each label."""
    from paddle_scorer.tasks.loading import check_tokenizer

    enc = LabelEncoder(loaded.tokenizer, opts, loaded.context_length)

    def texts_of(rec, where):
        prompt = enc.prompt_text(rec, where)
        return [prompt.rstrip()] + [prompt + resolve_prefix(opts.label_prefix, prompt) + label for label in opts.labels]

    check_tokenizer(loaded, records, texts_of, hooks)


def _task(clf: Classifier, hooks, stream_block_records) -> "object":
    from paddle_scorer.runs.loop import WINDOW_RECORDS, Task

    loaded = clf.loaded

    def prepare(rows):
        return clf.prepare_many(rows)

    def records_per_flush(preps):
        if loaded.streamed:
            return stream_block_records or clf.backend.block_size(preps)
        return clf.records_per_flush(preps)

    def window_records(preps):
        if not loaded.streamed:
            return WINDOW_RECORDS
        width = max(len(p.context) + sum(len(x) - 1 for x in p.label_ids) for p in preps)
        block = stream_block_records or clf.backend.block_size_for(width, 1 << 40)
        hooks.info(f"streaming: blocks of up to {block} record(s); each decoder layer is read once per block.")
        return max(block, 1)

    order = None
    reuse = getattr(clf.backend, "reuse", None)
    if hasattr(reuse, "window_order"):  # in RAM (streamed: a window is a block, planned whole)
        def order(preps):  # records sharing a prefix worth keeping side by side, the others longest first
            return [preps[i] for i in reuse.window_order([p.context for p in preps])]

    return Task("classify", prepare, clf.score, records_per_flush, order, window_records)


def _run(clf: Classifier, calib, records, indexed, source, dest, hooks, stream_block_records, argv) -> ClassifyRun:
    import sys

    from paddle_scorer.runs.identity import classify_identity
    from paddle_scorer.runs.loop import execute
    from paddle_scorer.tasks.metrics import Collector, evaluate

    loaded, opts = clf.loaded, clf.opts
    # what --resume compares, with the model fingerprint (a hash of every weight file): only for an output
    identity = classify_identity(loaded, opts, use_chat=clf.use_chat, max_length=clf.max_length,
                                 id_field=source.id_field, limit=source.limit) if dest.output is not None else {}
    execution_info = {"execution": loaded.facts.execution["execution"]}
    if loaded.streamed and stream_block_records:
        execution_info["block_records"] = stream_block_records

    def finish_extra() -> dict:
        extra = {"prefix_reuse": clf.backend.reuse_stats()}
        if loaded.streamed:
            extra["streaming"] = clf.backend.stats.to_dict()
            extra["blocks"] = clf.backend.stats.blocks
        return extra

    outcome = execute(_task(clf, hooks, stream_block_records), records, indexed, output=dest.output,
                      resume=dest.resume, overwrite=dest.overwrite, identity=identity, loaded=loaded,
                      progress=lambda total: hooks.progress("classify", total),
                      meta_extra={"options": opts.to_dict(), "input": str(source.input) if source.input else None,
                                  "argv": sys.argv[1:] if argv is None else argv, "calibration": calib,
                                  "forced": clf.encoder.prompter.forced, "run_config": identity, **execution_info},
                      summariser=lambda: Collector(opts.labels), finish_extra=finish_extra)
    stats = outcome.stats
    stats.records = outcome.records
    whole = outcome.assembled or not outcome.worker.distributed
    if not whole:
        metrics = None
    elif outcome.final_meta is not None and "metrics" in outcome.final_meta:
        metrics = outcome.final_meta["metrics"]
    else:
        metrics = evaluate(outcome.records, opts.labels)
    run = ClassifyRun(stats, outcome.records, metrics, calib, loaded, outcome, dest.output if whole else None)
    if run.part_only:
        hooks.info(f"worker {outcome.worker.rank}/{outcome.worker.world}: wrote {outcome.part}; {dest.output} is "
                   f"assembled by the last worker to finish (or `paddle-scorer gather {dest.output}`).")
    return run
