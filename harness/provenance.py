"""What produced a run or a report: the date, the code's git commit, the package versions, the device, and the sha256
of the files that went in. train.py writes it into args.json and summary.json, eval.py into report.json."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

PACKAGES = ("torch", "bitsandbytes", "safetensors", "tokenizers", "pillow", "numpy")
CODE_ROOT = Path(__file__).resolve().parent.parent


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(root: Path = CODE_ROOT) -> str | None:
    """The code's commit, "+dirty" when tracked files differ from it; None outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def provenance(files: dict[str, str | Path | None], device: str | None = None, root: Path = CODE_ROOT) -> dict:
    """Date, commit, Python and package versions, the device, and {name: sha256} of `files` (None where a name has
    no file, as the toy's built-in data has none)."""
    made = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(root),
            "python": platform.python_version(), "packages": package_versions()}
    if device is not None:
        made["device"] = device
    made["sha256"] = {name: sha256_file(path) if path is not None and Path(path).is_file() else None
                      for name, path in files.items()}
    return made


# ---------------------------------------------------------------------------------------------------------------------
# What a run started from, compared on resume: a resumed run must read the same bytes it began with


def model_files(folder: str | Path, prefix: str = "model") -> dict[str, Path]:
    """The files of a model or adapter folder that decide what it computes, by a name for the record
    ("model/config.json", "model/model-00001-of-00002.safetensors", ...): its JSON files and its safetensors."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    return {f"{prefix}/{p.name}": p for p in files}


def fingerprints(files: dict[str, str | Path | None]) -> dict[str, str | None]:
    """{name: sha256} of each file (None where a name has no file)."""
    return {name: sha256_file(path) if path is not None and Path(path).is_file() else None
            for name, path in files.items()}


def changed_inputs(recorded: dict[str, str | None], files: dict[str, str | Path | None]) -> list[str]:
    """The names whose file is not the one recorded: changed, gone, or new (sorted). A run whose inputs changed under
    the same paths would continue on other data or another model, half and half: the caller refuses it, listing
    these."""
    now = fingerprints(files)
    return sorted(name for name in set(recorded) | set(now) if recorded.get(name) != now.get(name))
