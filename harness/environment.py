"""The environment record of a run: package versions, device, git commit and diff, command line."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

from harness.config import PROJECT_ROOT

ENVIRONMENT_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "mlflow", "optuna", "lm-eval", "numpy")



def _git(*args: str) -> str | None:
    """Run git in the project root and return its stdout, or None when git or the repository is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_versions() -> dict[str, str | None]:
    versions = {}
    for name in ENVIRONMENT_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment_record() -> tuple[dict, str]:
    """Return (record, git diff): versions, device, git state and command line of this process."""
    import torch

    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    # dirty counts untracked files too; `git diff HEAD` has no untracked content, so their paths are listed
    status = _git("status", "--porcelain")
    diff = (_git("diff", "HEAD") or "") if status else ""
    cuda = torch.cuda.is_available()
    record = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": _package_versions(),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_model(),
        "cpu_count": os.cpu_count(),
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "git_untracked": [line[3:] for line in (status or "").splitlines() if line.startswith("??")],
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
    }
    return record, diff
