"""Analysis helpers (loaders, figures, tables) arrive with the sweeps issue."""
