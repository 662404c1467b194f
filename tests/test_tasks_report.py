"""report: the page's numbers equal the metrics in code and what classify printed; images decode; it renders."""

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image
from typer.testing import CliRunner

import builders
from paddle_scorer.cli.app import app
from paddle_scorer.tasks.metrics import evaluate, reliability
from paddle_scorer.tasks.report import histogram, load_run, summarize

runner = CliRunner()
SCORER = builders.DEMO_SCORER
LABELS = SCORER["labels"]
CHROMIUM_SETUP = ".ci/ensure-chromium"  # run by `make test` (and so by .ci/run): finds or installs it


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The demo base without its adapter: near chance, so every figure has something in it."""
    out = tmp_path_factory.mktemp("report") / "base.jsonl"
    r = cli("classify", "--model", builders.DEMO_BASE, "--labels", ",".join(LABELS), "--template", SCORER["template"],
            "--input", builders.DEMO_QUERIES, "--output", out)
    assert r.exit_code == 0, r.output
    return out, r.stdout


@pytest.fixture(scope="module")
def page(base_run):
    out, _ = base_run
    html_path = out.with_suffix(".html")
    r = cli("report", out, "--html", html_path)
    assert r.exit_code == 0, r.output
    return html_path, html_path.read_text(encoding="utf-8"), r.stdout


def page_data(text: str) -> dict:
    m = re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", text, re.S)
    return json.loads(m.group(1))


def cells(text: str) -> dict:
    """{metric: (full-precision value, shown text)} from the metric table."""
    return {k: (float(v), shown) for k, v, shown in
            re.findall(r"data-metric='(\w+)' data-value='([^']+)'>([^<]+)</td>", text)}


def images(text: str) -> list[Image.Image]:
    out = []
    for b64 in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text):
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        img.load()
        out.append(img)
    return out


def test_page_metrics_equal_metrics_in_code_and_meta_and_classify_output(base_run, page):
    out, classify_stdout = base_run
    _, text, report_stdout = page
    records = [json.loads(line) for line in open(out)]
    expect = evaluate(records, LABELS)
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    shown = cells(text)
    for k in ("accuracy", "log_loss", "brier", "ece"):
        value, as_text = shown[k]
        assert value == pytest.approx(expect[k], abs=1e-12)  # in code
        assert value == pytest.approx(meta["metrics"][k], abs=1e-12)  # recorded by classify
        assert as_text == f"{meta['metrics'][k]:.4f}"
    assert int(shown["n"][0]) == expect["n"] == len(records)
    # the line classify printed is the line report prints
    line = (f"accuracy {expect['accuracy']:.4f}  log-loss {expect['log_loss']:.4f}  brier {expect['brier']:.4f}  "
            f"ECE {expect['ece']:.4f}  (n={expect['n']})")
    assert line in classify_stdout and line in report_stdout
    data = page_data(text)
    assert data["metrics"]["confusion"] == expect["confusion"] == meta["metrics"]["confusion"]
    assert data["reliability"] == reliability([r for r in records if r.get("gold") is not None])
    assert data["recorded_metrics_agree"] is True
    for g in LABELS:
        for p in LABELS:
            assert f"data-gold='{g}' data-pred='{p}'>{expect['confusion'][g][p]}</td>" in text
    assert "These equal the metrics <code>classify</code> recorded" in text


def test_images_are_embedded_and_decode(page):
    _, text, _ = page
    imgs = images(text)
    assert len(imgs) == 2  # reliability, confidence histogram (the confusion matrix is a table, shown once)
    for img in imgs:
        assert img.format == "PNG"
        assert 250 <= img.width <= 1500 and 200 <= img.height <= 1500
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 10  # drawn, not blank
    assert "<img" in text and "src='http" not in text and "<link" not in text  # self-contained
    for fid in ("fig-reliability", "fig-confidence"):
        assert f"id='{fid}'" in text
    assert "fig-confusion" not in text and text.count("Confusion matrix") == 1


def test_edited_output_is_flagged(base_run, tmp_path):
    out, _ = base_run
    edited = tmp_path / "edited.jsonl"
    recs = [json.loads(line) for line in open(out)]
    recs[0]["gold"] = next(lab for lab in LABELS if lab != recs[0]["gold"])
    edited.write_text("".join(json.dumps(r) + "\n" for r in recs))
    shutil.copy(out.with_name(out.name + ".meta.json"), edited.with_name(edited.name + ".meta.json"))
    r = cli("report", edited)
    assert r.exit_code == 0, r.output
    assert "these differ from the metrics in the .meta.json" in r.stdout


def test_without_gold_labels_one_histogram_per_label(base_run, tmp_path):
    out, _ = base_run
    nogold = tmp_path / "nogold.jsonl"
    recs = [json.loads(line) for line in open(out)]
    for r in recs:
        r.pop("gold", None)
    nogold.write_text("".join(json.dumps(r) + "\n" for r in recs))
    html_path = tmp_path / "nogold.html"
    r = cli("report", nogold, "--html", html_path)
    assert r.exit_code == 0, r.output
    assert "no gold labels: per-label histograms" in r.stdout
    text = html_path.read_text()
    for i, lab in enumerate(LABELS):
        assert f"id='fig-label-{i}'" in text and f"Distribution of P({lab})" in text
    assert len(images(text)) == len(LABELS) + 1
    data = page_data(text)
    assert data["metrics"] is None and data["has_gold"] is False
    assert data["confidence_histogram"] == histogram([max(r["probs"].values()) for r in recs])
    for lab in LABELS:
        mean = sum(r["probs"][lab] for r in recs) / len(recs)
        assert data["per_label"][lab]["mean_prob"] == pytest.approx(mean)
    t = cli("report", nogold)
    assert t.exit_code == 0 and "no gold labels" in t.stdout and "per label" in t.stdout


def test_terminal_summary(base_run):
    out, _ = base_run
    r = cli("report", out)
    assert r.exit_code == 0, r.output
    s = summarize(load_run(out))
    assert f"accuracy {s['metrics']['accuracy']:.4f}" in r.stdout
    assert "confusion (rows: gold, columns: predicted)" in r.stdout and "reliability" in r.stdout


def test_not_a_classify_output(tmp_path):
    r = cli("report", builders.DEMO_QUERIES)
    assert r.exit_code == 2 and "not a classify record (no probs/prediction)" in r.stderr
    r = cli("report", tmp_path / "missing.jsonl")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_page_renders_in_headless_chromium(page, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")  # what .ci/ensure-chromium looks for
    assert chromium, (f"chromium is not installed and {CHROMIUM_SETUP} (run by `make test`) could not install it: "
                      "run `sudo apt-get install chromium`, then `make test`")
    html_path, _, _ = page
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
         "--window-size=1200,1600", html_path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1600)
    pixels = list(img.getdata())
    not_white = sum(1 for p in pixels if p != (255, 255, 255))
    assert not_white > 0.02 * len(pixels)  # text and figures, not a blank page
    # the figures' blue (#1f77b4) is on screen: the embedded images were decoded and painted
    blue = sum(1 for r, g, b in pixels if abs(r - 31) < 12 and abs(g - 119) < 12 and abs(b - 180) < 12)
    assert blue > 2000
