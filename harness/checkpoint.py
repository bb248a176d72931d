"""Training checkpoints: weights as safetensors, optimizer and scheduler state, RNG state, step.

Layout under the run folder (`<train.out_dir>/<run name>/`):
    checkpoints/step_000120/{model.safetensors, state.pt, rng.json, meta.json}
    checkpoints/latest          name of the newest complete checkpoint
A checkpoint is written into a `.tmp` folder and renamed when complete, and `latest` is replaced
atomically, so a killed process leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

log = logging.getLogger(__name__)
KEEP_LAST = 2


def run_dir(cfg) -> Path:
    """Return the folder holding this run's checkpoints."""
    return Path(cfg.train.out_dir) / cfg.name


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save(folder: Path, model, optimizer, scheduler, step: int, tracker=None) -> Path:
    """Write a complete checkpoint for `step` and point `latest` at it."""
    root = Path(folder) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp, final = root / f"{name}.tmp", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    # weights, optimizer/scheduler/torch RNG (tensors only, loadable with weights_only=True), python/numpy RNG
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }, tmp / "state.pt")
    (tmp / "rng.json").write_text(json.dumps(_rng_state()))
    meta = {"step": step, "run_id": getattr(tracker, "run_id", None)}
    (tmp / "meta.json").write_text(json.dumps(meta))

    # publish: rename the folder, then the pointer, then prune older checkpoints
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_text_atomic(root / "latest", name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint step=%d written to %s", step, final)
    return final


def latest(folder: Path) -> Path | None:
    """Return the newest complete checkpoint folder, or None."""
    pointer = Path(folder) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def saved_run_id(folder: Path) -> str | None:
    """Return the MLflow run id stored with the newest checkpoint, if any."""
    path = latest(folder)
    if path is None:
        return None
    return json.loads((path / "meta.json").read_text()).get("run_id")


def load_latest(folder: Path, model, optimizer, scheduler) -> int:
    """Restore the newest checkpoint into model, optimizer and scheduler; return its step."""
    path = latest(folder)
    if path is None:
        raise ValueError(f"no checkpoint to resume from in {Path(folder) / 'checkpoints'}: run without --resume first")
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    _set_rng_state(json.loads((path / "rng.json").read_text()))
    step = json.loads((path / "meta.json").read_text())["step"]
    log.info("resumed from %s at step=%d", path, step)
    return step
