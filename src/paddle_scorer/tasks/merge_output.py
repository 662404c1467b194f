"""Where a merge's output goes: the file names a merge writes, the checks on ``--out`` (``--force`` replaces
only an earlier merge output), the hidden temporary folder, the commit by rename, and the clean-up after
merges that were killed. Kept apart from :mod:`paddle_scorer.tasks.merge` (the tensor work) so each has one reason
to change."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from paddle_scorer.checkpoint import describe as ckpt
from paddle_scorer.checkpoint import sidecars
from paddle_scorer.errors import UsageError

# What PaddleNLP's save_pretrained writes (and from_pretrained looks for).
_SINGLE_NAME = {"safetensors": "model.safetensors", "pdparams": "model_state.pdparams"}
_SHARD_NAME = {"safetensors": "model-{i:05d}-of-{n:05d}.safetensors",
               "pdparams": "model_state-{i:05d}-of-{n:05d}.pdparams"}
_INDEX_NAME = {"safetensors": "model.safetensors.index.json", "pdparams": "model_state.pdparams.index.json"}
_CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")
_BASE_EXTRA_FILES = ("generation_config.json",)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_output(out: Path, base: Path, adapter: Path, force: bool) -> None:
    for role, folder in (("base model", base), ("adapter", adapter)):
        if _is_within(folder, out):
            raise UsageError(
                f"--out {out} is (or contains) the {role} folder {folder}; pass a new folder for the merged model."
            )
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise UsageError(f"--out {out} exists and is not a folder; pass a new folder path.")
        if not force:
            raise UsageError(f"--out {out} already exists; pass another folder, or add --force to replace it.")
        check_replaceable(out)


def _merge_output_names(folder: Path) -> set[str] | None:
    """The file names an earlier ``paddle-scorer merge`` wrote into ``folder``, or None if it is not one."""
    record = folder / ckpt.MERGE_RECORD
    if not record.is_file():
        return None
    try:
        files = json.loads(record.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return set(files)
    # records written before "files" was kept: what a merge can write
    names = {"config.json", ckpt.MERGE_RECORD, sidecars.SCORER_DEFAULTS, *_BASE_EXTRA_FILES, *_CHAT_TEMPLATE_FILES,
             *ckpt._TOKENIZER_FILES, *_INDEX_NAME.values(), *_SINGLE_NAME.values()}
    names |= {f.name for f in folder.iterdir() if _SHARD_RE.fullmatch(f.name)}
    return names


_SHARD_RE = re.compile(r"model(?:_state)?-\d{5}-of-\d{5}\.(?:safetensors|pdparams)")


def check_replaceable(out: Path) -> None:
    """``--force`` replaces only an empty folder or an earlier merge output holding nothing but what the merge
    wrote (as ``classify --overwrite`` replaces only our own outputs); anything else is refused, listing it."""
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return
    ours = _merge_output_names(out)
    if ours is None:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise UsageError(f"--out {out} is not an earlier merge output (no {ckpt.MERGE_RECORD}; it holds {shown}), so "
                         "--force will not replace it: pass a new folder, or move that one away yourself.")
    extra = [e for e in entries if e not in ours]
    if extra:
        shown = ", ".join(extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
        raise UsageError(f"--out {out} is an earlier merge output but also holds {shown}, which the merge did not "
                         "write, so --force will not replace it: move those files away, or pass a new folder.")


def temp_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def old_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.old-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    from paddle_scorer.process.signals import pid_alive

    return pid != os.getpid() and pid_alive(pid)


def clean_stale(out: Path) -> list[str]:
    """Remove what an interrupted merge to ``out`` left behind, judged by its process id: hidden
    ``.<name>.tmp-<pid>`` (an unfinished merge) and ``.<name>.old-<pid>`` (the folder a ``--force`` merge was
    replacing) whose process is gone. A folder of a live process is never touched. If a merge was killed
    between its two renames (``out`` missing, its previous version in ``.old-<pid>``), the previous version
    is put back. Returns one note per thing done."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(r"^\." + re.escape(out.name) + r"\.(tmp|old)-(\d+)$")
    stale = []
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(m.group(2))):
            stale.append((m.group(1), int(m.group(2)), entry))
    notes = []
    for kind, pid, entry in sorted(stale, key=lambda x: x[0] != "old"):  # restore before removing
        if kind == "old" and not (out.exists() or out.is_symlink()):
            os.rename(entry, out)
            notes.append(f"put back {out} from {entry.name}: a --force merge (process {pid}) was killed while "
                         "replacing it")
            continue
        shutil.rmtree(entry, ignore_errors=True)
        what = "an unfinished merge" if kind == "tmp" else "the replaced folder of a finished --force merge"
        notes.append(f"removed {entry.name}, left by {what} (process {pid} is gone)")
    return notes


def commit(tmp: Path, out: Path, force: bool) -> bool:
    """Rename ``tmp`` to ``out``; with ``force`` an existing ``out`` is renamed aside first, then deleted.
    Stop signals are held throughout, so an interrupted commit cannot leave ``out`` missing."""
    from paddle_scorer.process.signals import InterruptedAfterCommit, signals_held

    with signals_held() as got:
        if not (out.exists() or out.is_symlink()):
            os.rename(tmp, out)
            replaced = False
        else:
            if not force:  # appeared while we were merging
                raise UsageError(f"--out {out} already exists; pass another folder, or add --force to replace it.")
            if not out.is_dir() or out.is_symlink():  # replaced by a file or a link while we were merging
                raise UsageError(f"--out {out} is no longer a folder (it changed while merging); nothing was written: "
                                 "pass a new folder path.")
            check_replaceable(out)  # again: files may have been added while we were merging
            old = old_folder(out)
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
            replaced = True
    if got:
        raise InterruptedAfterCommit(f"the merge had already finished: {out} is complete.")
    return replaced
