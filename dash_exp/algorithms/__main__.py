"""Print the algorithm components' table (pasted into the README between its component-table markers)."""

from dash_exp.algorithms import components_table

print(components_table())
