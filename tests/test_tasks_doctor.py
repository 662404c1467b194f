"""doctor: pure checks on given version sets, and the real CLI reporting the installed versions."""

import json
import re
from importlib.metadata import PackageNotFoundError, version

import pytest
from typer.testing import CliRunner

from paddle_scorer.cli.app import app
from paddle_scorer.tasks.doctor import PACKAGES, release, runtime_findings, version_findings

runner = CliRunner()

GOOD = {"paddlepaddle": "3.3.1", "paddlepaddle-gpu": None, "paddlenlp": "3.0.0b4", "aistudio-sdk": "0.2.6",
        "pyarrow": "19.0.1", "datasets": "4.0.0", "numpy": "1.26.4"}


def codes(findings, level=None):
    return [f.code for f in findings if level is None or f.level == level]


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def test_release_parses_pre_releases():
    assert release("3.0.0b4") == (3, 0, 0)
    assert release("0.2.6") == (0, 2, 6)
    assert release("2.6.2.post1") == (2, 6, 2)
    assert release(None) is None and release("dev") is None


def test_the_pinned_set_is_clean():
    assert version_findings(GOOD) == []


@pytest.mark.parametrize("change,code,level,fix", [
    ({"aistudio-sdk": "0.3.1"}, "aistudio-sdk", "error", "pip install aistudio-sdk==0.2.6"),
    ({"aistudio-sdk": "1.0.0"}, "aistudio-sdk", "error", "pip install aistudio-sdk==0.2.6"),
    ({"pyarrow": "21.0.0"}, "pyarrow-numpy", "error", "pip install 'pyarrow<21'"),
    ({"paddlenlp": "2.8.1"}, "paddlenlp2-paddle3", "error", "pip install paddlenlp==3.0.0b4"),
    ({"paddlepaddle-gpu": "3.0.0"}, "two-paddle-builds", "error", "pip uninstall -y paddlepaddle paddlepaddle-gpu"),
    ({"paddlepaddle": None}, "no-paddle", "error", "pip install -e '.[cpu]'"),
    ({"paddlenlp": None}, "no-model-library", "error", "pip install -e '.[cpu,nlp]'"),
    ({"paddleformers": "1.2.0"}, "two-model-libraries", "error", "one virtualenv per library"),
    ({"paddlenlp": None, "aistudio-sdk": "0.3.9", "paddleformers": "1.3.0"}, "paddleformers-version", "warning",
     "pip install paddleformers==1.2.0"),
    ({"datasets": "4.1.0"}, "datasets-pyarrow", "warning", "pip install datasets==4.0.0"),
    ({"numpy": "2.0.1", "pyarrow": "21.0.0"}, "numpy2-paddlenlp", "warning", "numpy<=1.26.4"),
    ({"paddlepaddle": "2.6.2"}, "paddlenlp3-paddle2", "warning", "paddlepaddle 3.3.1"),
])
def test_known_bad_combinations(change, code, level, fix):
    found = version_findings({**GOOD, **change})
    assert code in codes(found, level), found
    assert fix in next(f.message for f in found if f.code == code)


def test_each_rule_needs_its_whole_combination():
    # pyarrow 21 is fine with NumPy 2; aistudio-sdk 0.3 is fine without paddlenlp; paddlenlp 2.x with paddle 2.6
    assert "pyarrow-numpy" not in codes(version_findings({**GOOD, "pyarrow": "21.0.0", "numpy": "2.1.0"}))
    assert "aistudio-sdk" not in codes(version_findings({**GOOD, "paddlenlp": None, "aistudio-sdk": "0.3.1"}))
    assert "paddlenlp2-paddle3" not in codes(version_findings({**GOOD, "paddlenlp": "2.8.1", "paddlepaddle": "2.6.2"}))


def test_a_paddleformers_environment_is_clean_without_paddlenlp():
    formers = {**GOOD, "paddlenlp": None, "aistudio-sdk": "0.3.9", "pyarrow": "20.0.0", "paddleformers": "1.2.0"}
    assert version_findings(formers) == []


def test_runtime_findings():
    amd = {"cpu": {"vendor": "AuthenticAMD", "usable_cores": 2,
                   "settings": {"MKL_DEBUG_CPU_TYPE": {"value": None}, "OMP_NUM_THREADS": {"value": "8"}}}}
    assert codes(runtime_findings(amd), "warning") == ["amd-mkl", "threads-oversubscribed"]
    intel = {"cpu": {"vendor": "GenuineIntel", "usable_cores": 8,
                     "settings": {"MKL_DEBUG_CPU_TYPE": {"value": None}, "OMP_NUM_THREADS": {"value": "8"}}}}
    assert runtime_findings(intel) == []
    gpu = {"paddle": {"compiled_with_cuda": True, "device_count": 0, "cuda_visible_devices": ""}}
    assert codes(runtime_findings(gpu)) == ["gpu-not-visible"]
    broken = {"libraries": {"paddlenlp": {"installed": True, "import_ok": False,
                                          "error": "ImportError: cannot import name 'download'"},
                            "paddleformers": {"installed": False, "import_ok": None, "error": None}}}
    assert codes(runtime_findings(broken), "error") == ["paddlenlp-import"]


@pytest.fixture(scope="module")
def doctor_json():
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_doctor_json_reports_the_installed_versions(doctor_json):
    assert set(doctor_json["packages"]) == set(PACKAGES)
    for name in PACKAGES:
        assert doctor_json["packages"][name] == installed(name), name
    import paddle
    import platform

    assert doctor_json["paddle"]["version"] == paddle.__version__
    assert doctor_json["paddle"]["build"] == ("gpu" if paddle.is_compiled_with_cuda() else "cpu")
    assert doctor_json["python"]["version"] == platform.python_version()
    libs = doctor_json["libraries"]
    assert libs["paddlenlp"]["import_ok"] is True and libs["paddlenlp"]["version"] == installed("paddlenlp")
    assert libs["paddleformers"]["installed"] is False and "Ernie4_5ForCausalLM" in libs["paddleformers"]["architectures"]
    assert doctor_json["ok"] is True and not codes_of(doctor_json, "error")
    assert doctor_json["memory"]["available"] > 0 and doctor_json["disk"][0]["free"] > 0
    assert set(doctor_json["cpu"]["settings"]) == {"MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"}


def codes_of(data, level):
    return [f["code"] for f in data["findings"] if f["level"] == level]


def test_doctor_table(doctor_json):
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 0, r.output
    assert re.search(rf"^paddle\s+{re.escape(doctor_json['paddle']['version'])}, (CPU|GPU) build", r.stdout, re.M)
    assert re.search(rf"^model library paddlenlp\s+{re.escape(installed('paddlenlp'))}, import ok", r.stdout, re.M)
    assert re.search(r"^model library paddleformers\s+not installed", r.stdout, re.M)
    assert "aistudio-sdk" in r.stdout and "OMP_NUM_THREADS" in r.stdout and "RAM" in r.stdout
    assert "ok:" in r.stdout
