"""Shared fixtures: the real embedded tiny model (built once per machine, cached) and config composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# small sizes for tests: the real code path and the default model (the cache `make run` uses), small batches
TEST_OVERRIDES = [
    "task.n_train=64", "task.n_test=16", "task.eval_size=8", "prompts_per_step=4", "group_size=4",
    "train_microbatch=4", "max_new_tokens=40", "logger=none", "threads=1", "eval_every=0",
]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def make_cfg(tmp_path):
    """Compose + validate the real Hydra config with test sizes and a per-test run dir."""
    from dash_exp.config import compose_config

    def make(*overrides: str):
        return compose_config([*TEST_OVERRIDES, f"run_dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture
def cli_env():
    """Environment for `python -m dash_exp...` subprocesses: W&B offline and quiet, one thread."""
    env = dict(os.environ)
    env.pop("WANDB_API_KEY", None)
    env.update({"WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"})
    return env
