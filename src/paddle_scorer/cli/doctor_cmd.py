"""`paddle-scorer doctor`: versions, the paddle build and its GPUs, CPU knobs, RAM/disk, known-bad combinations."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from paddle_scorer import fmt_bytes
from paddle_scorer.cli import helptext
from paddle_scorer.cli.common import cli_errors, out, styled

EXAMPLES = """
  paddle-scorer doctor
  paddle-scorer doctor --json > doctor.json   # attach this to a bug report
"""


def _v(value) -> str:
    return "[dim]not installed[/]" if value is None else escape(str(value))


def _row(t: Table, key: str, value: str) -> None:
    t.add_row(key, styled(value))  # values are our markup with user text escaped


def render(facts: dict) -> None:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="cyan", no_wrap=True)
    t.add_column()
    py = facts["python"]
    _row(t, "python", f"{py['version']} ({escape(py['executable'])})")
    _row(t, "platform", escape(facts["platform"]))
    pd = facts["paddle"]
    if pd.get("error"):
        _row(t, "paddle", f"[bold red]import fails[/]: {escape(pd['error'])}")
    else:
        build = (f"GPU build, CUDA {pd.get('cuda')}, cuDNN {pd.get('cudnn')}" if pd.get("compiled_with_cuda")
                 else "CPU build (float32 only: no float16/bfloat16 CPU kernels)")
        _row(t, "paddle", f"{pd['version']}, {build}, MKL {pd.get('with_mkl')}")
        if pd.get("compiled_with_cuda"):
            _row(t, "visible GPUs", f"{pd.get('device_count', 0)} (CUDA_VISIBLE_DEVICES={pd.get('cuda_visible_devices')!r})")
            for d in pd.get("devices", []):
                mem = f", {fmt_bytes(d['memory_bytes'])}" if d.get("memory_bytes") else ""
                _row(t, f"  gpu:{d['index']}", f"{escape(d['name'])}, compute capability {d['compute_capability']}{mem}, "
                                                 f"float16 {'yes' if d['float16'] else 'no'}, "
                                                 f"bfloat16 {'yes' if d['bfloat16'] else 'no'}")
            if pd.get("device_error"):
                _row(t, "  devices", f"[red]{escape(pd['device_error'])}[/]")
    for name, lib in facts["libraries"].items():
        builds = f"builds {', '.join(lib['architectures'])}"
        if not lib["installed"]:
            _row(t, f"model library {name}", f"[dim]not installed[/] ({builds}; it needs a virtualenv of its own)")
        elif lib["import_ok"]:
            _row(t, f"model library {name}", f"{escape(lib['version'])}, import ok ({builds})")
        else:
            _row(t, f"model library {name}", f"{escape(lib['version'])}, [bold red]import fails[/]: "
                                             f"{escape(lib.get('error') or '')}")
    from paddle_scorer.tasks.doctor import OPTIONAL

    for name, version in facts["packages"].items():
        if name in OPTIONAL and version is None:
            continue
        _row(t, f"  {name}", _v(version))
    cpu = facts["cpu"]
    _row(t, "cpu", f"{cpu.get('vendor') or 'unknown vendor'}, {cpu['usable_cores']} usable core(s)")
    for var, s in cpu["settings"].items():
        who = "set by paddle-scorer" if (s["value"] is not None and s["set_by"] == "paddle-scorer") else \
            ("set by you" if s["value"] is not None else "unset")
        _row(t, f"  {var}", f"{s['value'] if s['value'] is not None else '-'} ({who})")
    gemm = cpu.get("gemm") or {}
    if gemm.get("path"):
        others = ", ".join(f"{n} {g:.0f}" for n, g in gemm["measured"].items() if n != gemm["path"])
        m, k, n = gemm["shape"]
        _row(t, "  float32 GEMM", f"{gemm['path']} {gemm['gflops']:.0f} GFLOP/s" + (f" (also measured: {others})" if others else "")
             + f" on [{m}x{k}] x [{k}x{n}]; chosen per run (PADDLE_SCORER_GEMM=paddle|numpy forces one)")
        for name, why in (gemm.get("excluded") or {}).items():
            _row(t, f"  {name} GEMM", f"[yellow]not used[/]: {escape(why)}")
        for d in gemm.get("decisions") or []:
            if not d.get("this_machine"):
                continue
            c = d.get("conditions") or {}
            how = ("quiet" if c.get("quiet") else f"[yellow]in noise[/] ({escape(c.get('noise') or 'not recorded')}): "
                   "measured again by the next run") if c else "[yellow]how quiet not recorded[/]: measured again by the next run"
            speeds = ", ".join(f"{n} {g:.0f}" for n, g in (d.get("measured") or {}).items())
            _row(t, f"  decision {d['shape']}", f"{d['path']} ({speeds} GFLOP/s) at {d.get('at') or '?'}, {how}"
                 + (f"; other programs {c['foreign']:.0%}, spread {c['spread']:.0%}" if c.get("foreign") is not None
                    else ""))
        if gemm.get("rechecked"):
            _row(t, "  --recheck", f"{gemm['rechecked']} decision(s) measured again now")
    elif gemm.get("error"):
        _row(t, "  float32 GEMM", f"[bold red]no kernel passed its check[/]: {escape(gemm['error'])}")
    mem = facts["memory"]
    _row(t, "RAM", f"{fmt_bytes(mem['available'])} free of {fmt_bytes(mem['total'])}")
    for d in facts["disk"]:
        _row(t, f"disk ({d['what']})", f"{fmt_bytes(d['free'])} free of {fmt_bytes(d['total'])} at {escape(d['path'])}")
    out.print(t)
    for f in facts["findings"]:
        colour = "bold red" if f["level"] == "error" else "yellow"
        out.print(styled(f"[{colour}]{f['level']}:[/] {escape(f['message'])}"))
    if facts["ok"]:
        out.print(styled("[green]ok[/]: no known-bad combination found." if not facts["findings"] else
                         "[green]ok[/]: nothing broken (see the warnings above)."))


def register(app: typer.Typer) -> None:
    @app.command("doctor", **helptext.command(
        "Check the environment: Python, paddle, GPUs, the model library, pinned dependencies.",
        """Shows the paddle build and its GPUs (float16/bfloat16 support), the model library (paddlenlp or
        paddleformers), the pinned dependencies (known-bad combinations flagged), the serve extra, threads, MKL
        and free RAM and disk. Exit code 0 when nothing is broken, 1 when a known-bad combination or a failing
        import is found.""",
        EXAMPLES))
    @cli_errors
    def doctor(as_json: bool = typer.Option(False, "--json", help="Print the facts and findings as JSON."),
               recheck: bool = typer.Option(False, "--recheck", help="Measure this machine's GEMM kernel decisions "
                                            "again (do it when the machine is quiet).")):
        from paddle_scorer.tasks.doctor import collect

        facts = collect(recheck)
        if as_json:
            typer.echo(json.dumps(facts, indent=2, ensure_ascii=False, default=str))
        else:
            render(facts)
        if not facts["ok"]:
            raise typer.Exit(1)
