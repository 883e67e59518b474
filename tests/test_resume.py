"""Checkpoint/resume of real runs: a resumed run continues bit-exactly; checkpoint rotation; resume=never."""

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEST_OVERRIDES

from dash_exp.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from dash_exp.run import train

TIMING = ("time/", "throughput/", "mem/")


def untimed(row: dict) -> dict:
    """A metrics row or eval dict without its wall-clock keys."""
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def state_at(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "state.pt", map_location="cpu",
                      weights_only=False)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def resumed_pair(tmp_path_factory) -> tuple[Path, Path, dict, dict, dict]:
    """Run A: steps=4 save_every=2. Run B: steps=2, then train() again on the same dir with steps=4.
    Computed once per module (several tests read the same two run dirs), in a directory of the module's own: a
    test's tmp_path is removed when that test passes (tmp_path_retention_policy), the module's lives on."""
    from dash_exp.config import compose_config

    root = tmp_path_factory.mktemp("resumed_pair")
    dir_a, dir_b = root / "A", root / "B"
    common = [*TEST_OVERRIDES, "algorithm=dash", "save_every=2"]
    train(compose_config([*common, "steps=4", f"run_dir={dir_a}"]))
    summary_a = json.loads((dir_a / "summary.json").read_text())
    first_b = train(compose_config([*common, "steps=2", f"run_dir={dir_b}"]))
    second_b = train(compose_config([*common, "steps=4", f"run_dir={dir_b}"]))
    return dir_a, dir_b, summary_a, first_b, second_b


@pytest.mark.integration
def test_resumed_run_ends_bit_identical_to_uninterrupted_run(resumed_pair):
    dir_a, dir_b, summary_a, first_b, second_b = resumed_pair
    assert summary_a["resumed"] is False and first_b["resumed"] is False
    assert second_b["resumed"] is True
    assert second_b["steps"] == summary_a["steps"] == 4
    # A's mid-run checkpoint at step 2 and B's end-of-run checkpoint at step 2 hold the same state
    a2, b2 = state_at(dir_a, 2), state_at(dir_b, 2)
    assert_same_tensors(a2["policy"], b2["policy"])
    assert a2["stream"] == b2["stream"] == {"consumed": 2 * 4}
    # ... and so do the final ones: weights, optimizer moments, stream position
    a4, b4 = state_at(dir_a, 4), state_at(dir_b, 4)
    assert_same_tensors(a4["policy"], b4["policy"])
    assert a4["stream"] == b4["stream"] == {"consumed": 4 * 4}
    opt_a, opt_b = a4["optimizer"]["state"], b4["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        assert_same_tensors(opt_a[k], opt_b[k])
    assert not all(torch.equal(a2["policy"][k], a4["policy"][k]) for k in a4["policy"])  # training moved
    # the resumed run keeps the initial eval of its first part and ends with the same final eval
    assert second_b["initial"] == first_b["initial"]  # restored from the checkpoint, timings included
    assert untimed(second_b["initial"]) == untimed(summary_a["initial"])
    assert untimed(second_b["final"]) == untimed(summary_a["final"])
    assert read_meta(dir_b / "checkpoints" / "step_00000004")["initial_eval"] == first_b["initial"]


@pytest.mark.integration
def test_resumed_run_metrics_match_uninterrupted_run(resumed_pair):
    dir_a, dir_b = resumed_pair[:2]
    rows_a, rows_b = metrics(dir_a), metrics(dir_b)
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == [0, 1, 2, 3, 4, 4]
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert untimed(row_b) == untimed(row_a), row_a["step"]  # tolerance 0: the resumed run replays bit-exactly


@pytest.mark.unit
def test_save_checkpoint_keeps_newest_and_latest_ignores_incomplete(tmp_path):
    rng_states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        assert latest_checkpoint(tmp_path) is None
        for step in range(1, 6):
            path = save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"tag": step}, keep=2)
            assert path.name == f"step_{step:08d}"
        root = tmp_path / "checkpoints"
        assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]  # no temp dirs left
        assert latest_checkpoint(tmp_path) == root / "step_00000005"
        assert read_meta(root / "step_00000005") == {"tag": 5, "step": 5}
        save_checkpoint(tmp_path, 6, {"w": torch.zeros(2)}, {}, keep=3)
        assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005", "step_00000006"]
        # re-saving an existing step replaces it
        save_checkpoint(tmp_path, 6, {"w": torch.ones(2)}, {"again": True}, keep=3)
        assert read_meta(root / "step_00000006") == {"again": True, "step": 6}
        assert torch.equal(torch.load(root / "step_00000006" / "state.pt", weights_only=False)["w"], torch.ones(2))
        # an interrupted write: a newer step dir without meta.json, and a leftover temp dir, are never "latest"
        (root / "step_00000009").mkdir()
        (root / "step_00000009" / "state.pt").write_bytes(b"partial")
        (root / ".tmp_crashed").mkdir()
        (root / ".tmp_crashed" / "meta.json").write_text("{}")
        assert latest_checkpoint(tmp_path) == root / "step_00000006"
        # load_checkpoint restores the global RNG streams saved with the checkpoint
        path = save_checkpoint(tmp_path, 7, {}, {}, keep=10)
        expected = random.random(), float(np.random.rand()), torch.rand(3)
        state, meta = load_checkpoint(path)
        assert meta == {"step": 7} and set(state) == {"rng"}
        again = random.random(), float(np.random.rand()), torch.rand(3)
        assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])
    finally:
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.set_rng_state(rng_states[2])


@pytest.mark.integration
def test_resume_never_starts_from_scratch(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    common = ["algorithm=grpo", f"run_dir={run_dir}"]
    first = train(make_cfg(*common, "steps=4", "save_every=2"))
    old2, old4 = state_at(run_dir, 2), state_at(run_dir, 4)
    assert latest_checkpoint(run_dir).name == "step_00000004"
    again = train(make_cfg(*common, "steps=2", "resume=never"))
    assert again["resumed"] is False
    # from the base model, not from step 4: its step-2 weights are the first run's step-2 weights
    new2 = state_at(run_dir, 2)
    assert_same_tensors(new2["policy"], old2["policy"])
    assert not all(torch.equal(new2["policy"][k], old4["policy"][k]) for k in old4["policy"])
    assert untimed(again["initial"]) == untimed(first["initial"])  # evaluated afresh on the base model
    assert new2["stream"] == {"consumed": 2 * 4}
    # the earlier run is archived, not mixed in: a later resume=auto continues the new run
    assert latest_checkpoint(run_dir).name == "step_00000002"
    assert [r["step"] for r in metrics(run_dir)] == [0, 1, 2, 2]
    archived = list((run_dir / "previous").glob("*/checkpoints/step_00000004"))
    assert len(archived) == 1 and [r["step"] for r in metrics(archived[0].parent.parent)][-1] == 4


@pytest.mark.integration
def test_keep_final_checkpoint_false_drops_a_finished_runs_checkpoints_and_a_rerun_still_skips_it(make_cfg, tmp_path):
    from dash_exp.config import ConfigError

    run_dir = tmp_path / "run"
    common = ["algorithm=dash", "save_every=1", f"run_dir={run_dir}", "keep_final_checkpoint=false"]
    first = train(make_cfg(*common, "steps=2"))
    assert (run_dir / "summary.json").is_file() and not (run_dir / "checkpoints").exists()
    assert 0 <= time.time() - first["finished_at"] < 600  # when it finished, in the summary itself
    rows = (run_dir / "metrics.jsonl").read_text()
    # the same config again (keep_final_checkpoint is not part of what a run computes): skipped, nothing trained
    assert train(make_cfg(*common[:-1], "steps=2")) == json.loads((run_dir / "summary.json").read_text())
    assert first["steps"] == 2 and (run_dir / "metrics.jsonl").read_text() == rows
    # longer: there is no checkpoint to continue from, and it says so
    with pytest.raises(ConfigError, match="no checkpoint to continue from"):
        train(make_cfg(*common, "steps=3"))


@pytest.mark.integration
def test_a_bf16_compute_run_resumes_bit_exactly_from_its_fp32_masters(make_cfg, tmp_path):
    # model.dtype=bfloat16: checkpoints hold the fp32 master weights and fp32 AdamW moments; resuming them gives
    # the uninterrupted run's weights bit for bit
    common = ["algorithm=dash", "save_every=2", "model.dtype=bfloat16"]
    dir_a, dir_b = tmp_path / "A", tmp_path / "B"
    train(make_cfg(*common, "steps=4", f"run_dir={dir_a}"))
    train(make_cfg(*common, "steps=2", f"run_dir={dir_b}"))
    assert train(make_cfg(*common, "steps=4", f"run_dir={dir_b}"))["resumed"] is True
    a4, b4 = state_at(dir_a, 4), state_at(dir_b, 4)
    assert {t.dtype for t in a4["policy"].values()} == {torch.float32}
    assert_same_tensors(a4["policy"], b4["policy"])
    for k in a4["optimizer"]["state"]:
        assert_same_tensors(a4["optimizer"]["state"][k], b4["optimizer"]["state"][k])


def wandb_history(run_file: Path) -> dict[int, dict]:
    """A W&B run file's history, step -> {key: value}, read straight from its records (the leveldb log format:
    a 7-byte `:W&B` header, then 32 KiB blocks of records, each a 4-byte checksum, a 2-byte length, a 1-byte type
    (1 whole, 2 first, 3 middle, 4 last part) and the bytes of a protobuf `Record`)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = run_file.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    payloads, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding to the block's end
            pos += block - pos % block if pos % block else 0
        elif kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    history: dict[int, dict] = {}
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[int(items.pop("_step"))] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


@pytest.mark.integration
def test_a_killed_and_resumed_wandb_run_has_exactly_the_history_of_metrics_jsonl(tmp_path, cli_env):
    """Offline W&B: the killed attempt logged steps past its last checkpoint; the resumed attempt's W&B run (the
    one left to sync) holds exactly metrics.jsonl's steps and values, and the killed one is set aside."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, TEST_OVERRIDES

    run_dir = tmp_path / "run"
    small = [o for o in TEST_OVERRIDES if not o.startswith(("run_dir=", "logger="))]
    cmd = [sys.executable, "-m", "dash_exp.run", *small, "logger=wandb", "logger.mode=offline", "steps=6",
           "save_every=2", "eval_every=3", f"hydra.run.dir={run_dir}"]
    env = {**cli_env, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step_00000002" / "meta.json").exists() or len(
            [r for r in metrics(run_dir) if "time/step" in r]) < 3:  # killed after a step the checkpoint lacks
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = {r["step"] for r in metrics(run_dir)}
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = metrics(run_dir)
    expected: dict[int, dict] = {}
    for row in rows:
        expected.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step" and v is not None})
    live = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(live) == 1, live  # the killed attempt's files are set aside
    assert len(list((run_dir / "wandb" / "superseded").glob("offline-run-*/run-*.wandb"))) == 1
    history = wandb_history(live[0])
    assert max(killed) >= 3 and sorted(history) == sorted(expected) == list(range(7))
    for step, values in expected.items():
        assert history[step] == pytest.approx(values), step


@pytest.mark.unit
def test_every_earlier_attempts_offline_wandb_run_is_set_aside(make_cfg, tmp_path):
    """Resumed twice: the checkpoint names attempt A, but attempt B was killed before its first checkpoint; both
    offline runs leave what `wandb sync` would upload."""
    from dash_exp.tracking import supersede_wandb_run

    cfg = make_cfg("logger=wandb")
    wandb_dir = tmp_path / "wandb"
    for name in ("offline-run-20261206_010000-aaaa1111", "offline-run-20261206_020000-bbbb2222"):
        (wandb_dir / name).mkdir(parents=True)
        (wandb_dir / name / f"run-{name[-8:]}.wandb").write_bytes(b":W&B")
    supersede_wandb_run(tmp_path, cfg.logger, "offline", "aaaa1111")
    assert not list(wandb_dir.glob("offline-run-*"))
    assert sorted(p.name for p in (wandb_dir / "superseded").iterdir()) == [
        "offline-run-20261206_010000-aaaa1111", "offline-run-20261206_020000-bbbb2222"]
