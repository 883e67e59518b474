#!/usr/bin/env bash
# Does a refactor change what runs do? Runs each algorithm preset for a few steps at git revision REV and in this
# working tree, with the same seed, and compares their metrics.jsonl step for step: every metric REV logged (but
# wall-clock times, throughputs and memory peaks, which no two runs share) must have the same value; metrics only the
# working tree logs are listed. Prints one line per preset; exits 1 if any differ.
#   scripts/same_metrics.sh REV [preset ...]     (default presets: base sft grpo dash dash_nogf ppo ppo_mini)
#   ARGS="kl=on" scripts/same_metrics.sh f7e1ca5 dash      extra overrides for both sides
set -euo pipefail
rev=${1:?usage: scripts/same_metrics.sh REV [preset ...]}
shift
presets=("${@:-base sft grpo dash dash_nogf ppo ppo_mini}")
read -r -a presets <<< "${presets[*]}"
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$here" worktree add --detach "$work/old" "$rev" >/dev/null
python=$here/.venv/bin/python
common=(logger=none threads=1 steps=3 prompts_per_step=4 group_size=4 train_microbatch=4 eval_every=2
        task.eval_size=16 max_new_tokens=32 ${ARGS:-})
status=0
for preset in "${presets[@]}"; do
    for side in old new; do
        src=$here; [ "$side" = old ] && src=$work/old
        (cd "$src" && PYTHONPATH=$src "$python" -m dash_exp.run "algorithm=$preset" "${common[@]}" \
            "run_dir=$work/$side-$preset" > "$work/$side-$preset.log" 2>&1) \
            || { echo "$preset: the $side side failed, see its log:"; tail -5 "$work/$side-$preset.log"; exit 1; }
    done
    "$python" - "$preset" "$work/old-$preset/metrics.jsonl" "$work/new-$preset/metrics.jsonl" <<'PY' || status=1
import json, sys
preset, old, new = sys.argv[1:]
VARIES = ("time/", "throughput/", "mem/", "_runtime", "_timestamp")
def rows(path):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(VARIES)} for line in open(path)]
a, b = rows(old), rows(new)
# every metric the old side logged must be there with the same value; metrics only the new side logs are new knobs'
diff = [(i, k, x.get(k), y.get(k)) for i, (x, y) in enumerate(zip(a, b)) for k in sorted(x) if x.get(k) != y.get(k)]
if len(a) != len(b) or diff:
    print(f"{preset}: DIFFERENT ({len(a)} vs {len(b)} rows; first differences {diff[:5]})")
    sys.exit(1)
added = sorted({k for x, y in zip(a, b) for k in y.keys() - x.keys()})
print(f"{preset}: same ({len(a)} rows, {sum(len(r) for r in a)} values, bit for bit); new metrics: {added or 'none'}")
PY
done
exit $status
