"""Tasks: problems with prompts and reference answers, scored by the shared grader."""
