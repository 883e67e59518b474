"""Atomic checkpoints (temp dir + rename) of everything a run needs to continue exactly."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step_"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint in the run dir (incomplete temp dirs never match)."""
    root = checkpoint_dir(run_dir)
    done = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "meta.json").exists()) if root.exists() else []
    return done[-1] if done else None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write state (torch objects) and meta (JSON) to checkpoints/step_<step>; keep the newest `keep`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_*"):  # left by a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=root))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({**state, "rng": rng}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path / 'state.pt'}: cannot read checkpoint state ({type(exc).__name__}: {exc})") from exc


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a checkpoint; restores the python/numpy/torch RNG states."""
    state, meta = read_checkpoint(path)
    restore_rng(state["rng"])
    return state, meta


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a checkpoint, the whole state read into host memory (RNG states untouched)."""
    return _read_state(path), read_meta(path)


def restore_rng(rng: dict[str, Any]) -> None:
    """The python/numpy/torch RNG states a checkpoint saved."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])


def fit_error(policy: torch.nn.Module, weights: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
              optimizer_state: dict[str, Any] | None = None) -> str | None:
    """Why a checkpoint's full weights (and optimizer state) do not fit `policy` (sharded or not: its parameters'
    global shapes) and `optimizer`, or None: a missing or unexpected tensor, the first shape that differs, or
    param groups of other sizes."""
    expected = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        return f"missing {missing[:3]}, unexpected {extra[:3]}"
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            return f"{key}: shape {tuple(weights[key].shape)} in the checkpoint, {shape} in the model"
    if optimizer is not None and optimizer_state is not None:
        saved = [len(g["params"]) for g in optimizer_state.get("param_groups", [])]
        have = [len(g["params"]) for g in optimizer.param_groups]
        if saved != have:
            return f"optimizer param groups of {saved} parameters in the checkpoint, {have} in the run"
    return None


def load_policy_weights(policy: torch.nn.Module, path: Path) -> int:
    """Load the policy weights of a run dir (its latest checkpoint) or a checkpoint dir; returns its step."""
    ckpt = latest_checkpoint(path) if checkpoint_dir(path).is_dir() else path
    if ckpt is None or not (ckpt / "state.pt").is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here (expected a run dir with checkpoints/step_*/ "
                                "or a checkpoint dir with state.pt)")
    state, meta = _read_state(ckpt), read_meta(ckpt)
    apply_policy_state(policy, state, ckpt)
    return int(meta["step"])


def full_state(policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The policy's and the optimizer's full state dicts on the CPU, keyed by parameter name: the same files for
    one process and for an FSDP-sharded policy (gathered; a collective: every rank calls it), so a checkpoint
    resumes on any number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(policy, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any], broadcast: bool = False) -> None:
    """Restore `full_state`'s optimizer state (resharded for an FSDP policy). `broadcast`: only rank 0 holds it
    (the others pass {}); torch sends it tensor by tensor, each rank keeping its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(policy, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast))


def apply_policy_state(policy: torch.nn.Module, state: dict[str, Any], path: Path, broadcast: bool = False) -> None:
    """Load a checkpoint's (full) policy weights, sharded or not; a checkpoint of another model gives one clear
    error. `broadcast`: only rank 0 holds them (the others pass {}), sent tensor by tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    try:
        set_model_state_dict(policy, state["policy"],
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast))
    except (RuntimeError, KeyError) as exc:
        # torch's first line is generic; the next one names the tensor and the shapes
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise ValueError(f"{path}: checkpoint does not fit the configured model ({detail})") from exc
