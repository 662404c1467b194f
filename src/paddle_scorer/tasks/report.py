"""`report`: a classify output as a page (or a terminal summary) you would rather look at than read.

:func:`load_run` reads ``out.jsonl`` and its ``.meta.json``; :func:`summarize` recomputes the
metrics with :mod:`paddle_scorer.tasks.metrics` (and compares them with the ones ``classify`` recorded);
:func:`figures` draws PNGs with matplotlib's Agg canvas (no pyplot, no display, no global backend
switch); :func:`render_html` puts it all in one self-contained HTML file (images inline as base64).
Nothing here imports paddle.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from paddle_scorer.jsonio import meta_path
from paddle_scorer.errors import UsageError
from paddle_scorer.tasks.metrics import Collector

METRICS = ("accuracy", "log_loss", "brier", "ece")
METRIC_NAMES = {"accuracy": "accuracy", "log_loss": "log-loss", "brier": "Brier score", "ece": "ECE"}
HIST_BINS = 20


@dataclass
class RunData:
    """A classify output as the report needs it: per record its label probabilities, prediction and gold label, in
    flat arrays (:class:`~paddle_scorer.tasks.metrics.Collector`; a million records in a few tens of MB)."""

    path: Path
    data: Collector
    meta: dict | None
    labels: list[str]
    notes: list[str] = field(default_factory=list)  # said first: a run still writing, killed, a stale meta

    @property
    def n(self) -> int:
        return len(self.data)


def run_notes(path: Path, meta: dict | None) -> list[str]:
    """What is true of ``path`` besides its records: a newer run writing it (or killed while writing it), and
    whether its ``.meta.json`` describes this very file (its recorded sha256)."""
    from paddle_scorer.runs.output_file import file_digest, run_state, working_path

    notes = []
    state = run_state(path)
    if state is not None:
        work = meta_path(working_path(path))
        try:
            wmeta = json.loads(work.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            wmeta = {}
        who = f"process {wmeta.get('pid')} on {wmeta.get('host')}" if wmeta.get("pid") else "a run"
        if state == "killed":
            notes.append(f"a run that was replacing {path} was killed ({who} is gone) and left partial results in "
                         f"{working_path(path).name}; this report shows the previous complete output: rerun that "
                         "command with --resume to finish it.")
        else:
            notes.append(f"a run is still writing a new version of {path} ({who}); this report shows the previous "
                         "complete output.")
    if meta is not None:
        recorded = meta.get("output_sha256")
        if meta.get("status") not in (None, "complete"):
            notes.append(f"{meta_path(path).name} says the run is {meta.get('status')!r}, not complete.")
        elif recorded and file_digest(path) != recorded:
            notes.append(f"{meta_path(path).name} does not describe {path.name}: the file was edited or replaced after "
                         "the run wrote it (its sha256 differs from the one recorded); the provenance shown is the "
                         "meta's, the numbers are recomputed from the file.")
    return notes


def _bad_record(rec, labels: list[str] | None) -> str | None:
    if not isinstance(rec, dict) or not isinstance(rec.get("probs"), dict) or "prediction" not in rec:
        return "not a classify record (no probs/prediction)"
    probs = rec["probs"]
    if not probs or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            and -1e-6 <= v <= 1 + 1e-6 for v in probs.values()):
        return "its probs are not probabilities (finite numbers in [0, 1])"
    total = math.fsum(float(v) for v in probs.values())
    if abs(total - 1.0) > 1e-6:
        return f"its probs sum to {total:.6g}, not 1 (classify writes a distribution over the labels; was it edited?)"
    if not isinstance(rec["prediction"], str) or rec["prediction"] not in probs:
        return f"its prediction {json.dumps(rec['prediction'])[:40]} is not one of its labels"
    if labels is not None and set(probs) != set(labels):
        return f"it has labels {sorted(probs)}, not {labels} (the file mixes runs)"
    return None


def load_run(path: str | Path) -> RunData:
    """Records of a classify output (``--output`` file) and its provenance, checked."""
    from paddle_scorer.errors import IncompleteRunError
    from paddle_scorer.runs.output_file import run_state, working_path

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; pass the JSONL file written by `paddle-scorer classify --output`.")
    if not path.is_file():
        state = run_state(path)
        if state is not None:
            raise IncompleteRunError(
                f"{path} does not exist yet: the run writing it " + (
                    f"was killed and left partial results in {working_path(path).name}; rerun the same classify "
                    "command with --resume to finish it." if state == "killed" else "is still running; wait for it.")
            )
        raise UsageError(f"{path} does not exist; pass the JSONL file written by `paddle-scorer classify --output`.")
    meta = None
    mp = meta_path(path)
    if mp.is_file():
        try:
            meta = json.loads(mp.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:
            raise UsageError(f"{mp} is not valid JSON ({exc}); re-run classify or delete it.") from None
        if not isinstance(meta, dict):
            raise UsageError(f"{mp} is not a JSON object; re-run classify or delete it.")
    recorded = ((meta or {}).get("run_config") or (meta or {}).get("identity") or {}).get("labels")
    labels = list(recorded) if isinstance(recorded, list) and all(isinstance(x, str) for x in recorded) else None
    data = None
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise UsageError(f"{path}:{lineno}: not a JSON line ({exc}); the file was damaged or edited: re-run "
                                 "classify with --overwrite.") from None
            problem = _bad_record(rec, labels)
            if problem is None and labels is None:
                labels = list(rec["probs"])
            problem = problem or _bad_record(rec, labels)
            if problem:
                hint = ("report reads the output of `paddle-scorer classify --output`, not generate traces or inputs"
                        if problem.startswith("not a classify") else "re-run classify with --overwrite")
                raise UsageError(f"{path}:{lineno}: {problem}; {hint}.")
            if data is None:
                data = Collector(labels)
            data.add(rec)
    if data is None:
        raise UsageError(f"{path} has no records; run classify first.")
    return RunData(path, data, meta, list(labels), run_notes(path, meta))


def histogram(values, bins: int = HIST_BINS) -> list[int]:
    """Counts over ``bins`` equal bins of [0, 1] (1.0 falls in the last)."""
    import numpy as np

    idx = np.clip((np.asarray(values, dtype=np.float64) * bins).astype(np.int64), 0, bins - 1)
    return np.bincount(idx, minlength=bins).tolist()


def summarize(run: RunData, bins: int = 10) -> dict:
    """Metrics (recomputed), reliability bins, per-label statistics, and agreement with the .meta.json."""
    labels, data = run.labels, run.data
    metrics = data.evaluate(bins)
    has_gold = bool(metrics and metrics.get("n"))
    known = data.known()
    probs, pred, gold = data.probs, data.pred, data.gold
    per_label = {}
    for j, lab in enumerate(labels):
        per_label[lab] = {"mean_prob": float(probs[:, j].mean()), "predicted": int((pred == j).sum()),
                          "gold": int((gold[known] == j).sum())}
    out = {
        "file": str(run.path),
        "n_records": run.n,
        "labels": labels,
        "has_gold": has_gold,
        "metrics": metrics if has_gold else None,
        "reliability": data.reliability(known, bins) if has_gold else None,
        "per_label": per_label,
        "confidence_histogram": histogram(data.confidence()),
        "recorded_metrics": (run.meta or {}).get("metrics"),
        "recorded_metrics_agree": None,
    }
    rec_m = out["recorded_metrics"]
    if rec_m and has_gold and bins == 10:  # classify records ECE over 10 bins
        out["recorded_metrics_agree"] = all(
            math.isclose(rec_m.get(k, float("nan")), metrics[k], rel_tol=1e-9, abs_tol=1e-12) for k in METRICS
        ) and rec_m.get("confusion") == metrics["confusion"]
    return out


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _figure(w: float, h: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UsageError(f"report --html draws its figures with matplotlib, which does not import ({exc}): "
                         "`pip install matplotlib`.") from None

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def reliability_png(rel: list[dict]) -> bytes:
    fig = _figure(5, 4.5)
    ax = fig.add_subplot()
    width = rel[0]["hi"] - rel[0]["lo"]
    full = [b for b in rel if b["count"]]
    ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
           color="#1f77b4", edgecolor="white", label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration", zorder=2)
    # drawn last and larger, with a white edge: often at (0.95, 0.95), on top of the bar and the diagonal
    ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "D", color="#d62728", ms=7, mec="white",
            mew=1, label="mean confidence (x) vs accuracy (y) in bin", zorder=5, clip_on=False)
    for b in full:
        ax.annotate(str(b["count"]), (b["lo"] + width / 2, b["accuracy"]), xytext=(0, 6), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7)
    ax.set(xlim=(-0.02, 1.02), ylim=(0, 1.12), xlabel="confidence (probability of the predicted label)",
           ylabel="accuracy", title="Reliability diagram (numbers: records per bin)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, fontsize=8, frameon=False)
    return _png(fig)


def confidence_png(data: Collector, with_gold: bool) -> bytes:
    fig = _figure(5, 4)
    ax = fig.add_subplot()
    edges = [i / HIST_BINS for i in range(HIST_BINS + 1)]
    conf = data.confidence()
    if with_gold:
        has = data.gold != -1  # records with a gold label (one that is not a label counts as wrong)
        right = data.pred == data.gold
        r, w = conf[has & right], conf[has & ~right]
        ax.hist([r, w], bins=edges, stacked=True, color=["#1f77b4", "#d62728"],
                label=[f"correct ({len(r)})", f"wrong ({len(w)})"])
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.hist(conf, bins=edges, color="#1f77b4")
    ax.set(xlim=(0, 1), xlabel="probability of the predicted label", ylabel="records",
           title="Confidence of the predictions")
    return _png(fig)


def label_histogram_png(data: Collector, label: str) -> bytes:
    fig = _figure(4, 3)
    ax = fig.add_subplot()
    ax.hist(data.probs[:, data.index[label]], bins=[i / HIST_BINS for i in range(HIST_BINS + 1)], color="#1f77b4")
    ax.set(xlim=(0, 1), xlabel=f"P({label})", ylabel="records", title=f"P({label}) over {len(data)} records")
    return _png(fig)


def figures(run: RunData, summary: dict) -> list[tuple[str, str, bytes]]:
    """``[(id, caption, png)]`` for the page. Label text is drawn as it is (``$`` is not TeX math here)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise UsageError(f"report --html draws its figures with matplotlib, which does not import ({exc}): "
                         "`pip install matplotlib`.") from None
    with matplotlib.rc_context({"text.parse_math": False}):
        return _figures(run, summary)


def _figures(run: RunData, summary: dict) -> list[tuple[str, str, bytes]]:
    figs = []
    if summary["has_gold"]:
        figs.append(("reliability", "Reliability diagram: accuracy against confidence per bin (closer to the "
                                    "diagonal is better calibrated).", reliability_png(summary["reliability"])))
        figs.append(("confidence", "Probability of the predicted label, split by correct and wrong predictions.",
                     confidence_png(run.data, True)))
    else:
        for i, lab in enumerate(run.labels):
            figs.append((f"label-{i}", f"Distribution of P({lab}) over all records.",
                         label_histogram_png(run.data, lab)))
        figs.append(("confidence", "Probability of the predicted label.", confidence_png(run.data, False)))
    return figs


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f5f8}td.l,th.l{text-align:left}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:1.5em;align-items:start}
figure{margin:0}figure img{width:100%;height:auto}figcaption{font-size:.85em;color:#555}.warn{color:#a15c00}
.tables{display:flex;flex-wrap:wrap;gap:2.5em;align-items:flex-start}.tables h2{margin-top:.6em}
.prov td{text-align:left;white-space:pre-wrap}code{background:#f3f3f3;padding:0 .2em}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _provenance_rows(meta: dict | None) -> list[tuple[str, str]]:
    if not meta:
        return [("provenance", "no .meta.json next to the output: model and options unknown")]
    model = meta.get("model") or {}
    rc = meta.get("run_config") or {}
    policy = model.get("policy") or {}
    rows = [
        ("tool", meta.get("tool")),
        ("model", model.get("model_path")),
        ("adapter", model.get("adapter_path")),
        ("adapter sha256", (model.get("adapter_sha256") or "")[:16] or None),
        ("mode", model.get("mode")),
        ("device / dtype", f"{policy.get('device')} / {policy.get('dtype')}" if policy else None),
        ("template", rc.get("template")),
        ("calibration", (rc.get("calibration") or {}).get("method") if isinstance(rc.get("calibration"), dict)
         else rc.get("calibration")),
        ("input", meta.get("input")),
        ("status", meta.get("status")),
        ("finished", meta.get("finished")),
    ]
    return [(k, str(v)) for k, v in rows if v not in (None, "")]


def render_html(run: RunData, summary: dict, figs: list[tuple[str, str, bytes]]) -> str:
    labels = run.labels
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>paddle-scorer report: {_e(run.path.name)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>paddle-scorer report: <code>{_e(run.path.name)}</code></h1>",
        f"<p>{summary['n_records']} records, labels {', '.join(f'<code>{_e(lab)}</code>' for lab in labels)}.</p>",
    ]
    parts += [f"<p class='warn note'>{_e(note)}</p>" for note in run.notes]
    m = summary["metrics"]
    if m:
        parts.append("<h2>Metrics</h2><table id='metrics'><tr><th class='l'>metric</th><th>value</th></tr>")
        for k in METRICS:
            parts.append(f"<tr><td class='l'>{METRIC_NAMES[k]}</td>"
                         f"<td class='metric' data-metric='{k}' data-value='{m[k]!r}'>{_fmt(m[k])}</td></tr>")
        parts.append(f"<tr><td class='l'>records with a gold label</td><td data-metric='n' data-value='{m['n']}'>{m['n']}</td></tr>")
        parts.append("</table>")
        if m.get("unknown_gold_labels"):
            parts.append(f"<p class='warn'>{m['n_unknown_gold']} record(s) have gold labels that are not candidates "
                         f"({_e(', '.join(m['unknown_gold_labels']))}); they are left out of the metrics.</p>")
        agree = summary["recorded_metrics_agree"]
        if agree is True:
            parts.append("<p>These equal the metrics <code>classify</code> recorded in the <code>.meta.json</code>.</p>")
        elif agree is False:
            parts.append("<p class='warn'>These differ from the metrics recorded in the <code>.meta.json</code>: "
                         "the output was changed after classify wrote it.</p>")
    else:
        parts.append("<p>No gold labels in this output (classify reads them from the <code>label</code> field, "
                     "or <code>--gold-field</code>): showing the probability distributions per label.</p>")
    parts.append("<h2>Figures</h2><div class='figs'>")
    for fid, caption, png in figs:
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure id='fig-{_e(fid)}'><img alt='{_e(caption)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    parts.append("</div>")
    if m:
        parts.append("<div class='tables'><div><h2>Confusion matrix</h2><table id='confusion'><tr><th class='l'>gold \\ predicted</th>"
                     + "".join(f"<th>{_e(p)}</th>" for p in labels) + "</tr>")
        for g in labels:
            parts.append(f"<tr><th class='l'>{_e(g)}</th>"
                         + "".join(f"<td data-gold='{_e(g)}' data-pred='{_e(p)}'>{m['confusion'][g][p]}</td>" for p in labels)
                         + "</tr>")
        parts.append("</table></div><div><h2>Reliability bins</h2><p>Bins without records are left out.</p><table id='reliability'><tr><th>confidence bin</th>"
                     "<th>records</th><th>mean confidence</th><th>accuracy</th></tr>")
        for b in summary["reliability"]:
            if not b["count"]:
                continue
            parts.append(f"<tr><td>{b['lo']:.1f}-{b['hi']:.1f}</td><td>{b['count']}</td>"
                         f"<td>{_fmt(b['confidence'])}</td><td>{_fmt(b['accuracy'])}</td></tr>")
        parts.append("</table></div></div>")
    parts.append("<h2>Per label</h2><table id='per-label'><tr><th class='l'>label</th><th>mean probability</th>"
                 "<th>predicted</th>" + ("<th>gold</th>" if m else "") + "</tr>")
    for lab in labels:
        s = summary["per_label"][lab]
        parts.append(f"<tr><td class='l'>{_e(lab)}</td><td>{_fmt(s['mean_prob'])}</td><td>{s['predicted']}</td>"
                     + (f"<td>{s['gold']}</td>" if m else "") + "</tr>")
    parts.append("</table><h2>Provenance</h2><table class='prov'>")
    for k, v in _provenance_rows(run.meta):
        parts.append(f"<tr><th class='l'>{_e(k)}</th><td>{_e(v)}</td></tr>")
    parts.append("</table>")
    data = json.dumps({k: summary[k] for k in ("n_records", "labels", "has_gold", "metrics", "reliability",
                                                "per_label", "confidence_histogram", "recorded_metrics_agree")},
                      ensure_ascii=False).replace("</", "<\\/")
    parts.append(f"<script type='application/json' id='report-data'>{data}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


PAGE_MARK = "<title>paddle-scorer report"


def check_html_path(run: RunData, out: Path) -> None:
    """Refuse an --html path that would destroy something: the run's output, its provenance, its input, a
    folder or device, or an existing file that is not a previous report (checked before anything is drawn)."""
    from paddle_scorer.runs.output_file import same_file, working_path

    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--html {out} is a directory; pass a file path such as {out}/report.html.")
    if out.exists() and not out.is_file():
        raise UsageError(f"--html {out} exists and is not a regular file; pass a file path.")
    src = (run.meta or {}).get("input")
    protected = [(run.path, "the results file it reports on"), (meta_path(run.path), "the results' .meta.json"),
                 (working_path(run.path), "the working file of a run")]
    if isinstance(src, str) and src:
        protected.append((Path(src), "the run's input"))
    for p, what in protected:
        if same_file(out, p):
            raise UsageError(f"--html {out} is {what}; writing the page there would destroy it: pass another path.")
    if out.name.endswith(".meta.json"):
        raise UsageError(f"--html {out} is a provenance file name (.meta.json); pass a path ending in .html.")
    if out.is_file() and out.stat().st_size:
        with open(out, "rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")
        if PAGE_MARK not in head:
            raise UsageError(f"--html {out} exists and is not a paddle-scorer report; it is never overwritten: pass "
                             "another path (or delete it first).")


def write_html(run: RunData, out: str | Path, bins: int = 10) -> dict:
    """Write the page atomically (a hidden temporary file renamed into place, permissions from the umask);
    returns the summary it shows."""
    import os
    import tempfile

    from paddle_scorer.runs.output_file import chmod_default

    out = Path(out)
    check_html_path(run, out)
    summary = summarize(run, bins)
    page = render_html(run, summary, figures(run, summary))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
            fh.flush()
            os.fsync(fh.fileno())
        chmod_default(Path(tmp))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return summary
