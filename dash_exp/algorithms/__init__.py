"""The algorithm components, each a registry chosen by one config key (COMPONENTS), and the update step.

`python -m dash_exp.algorithms` prints the components' table (README.md and docs/algorithms.md).
"""

from dash_exp.algorithms.advantages import ADVANTAGES
from dash_exp.algorithms.correction import ROLLOUT_CORRECTIONS
from dash_exp.algorithms.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from dash_exp.algorithms.registry import Registry

# config key -> its registry; config.validate checks each key against its registry's names
COMPONENTS: dict[str, Registry] = {r.key: r for r in (ADVANTAGES, POLICY_LOSSES, AGGREGATIONS, KL_ESTIMATORS,
                                                     ROLLOUT_CORRECTIONS)}


def components_table() -> str:
    """The markdown table of every component option: key, option, what it computes, source."""
    rows = "\n".join(r.markdown() for r in COMPONENTS.values())
    return f"| key | option | what it computes | source |\n|---|---|---|---|\n{rows}"
