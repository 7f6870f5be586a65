"""Tasks: the `Task` arrays, task files and their validation, generators (random trees,
gridworlds, gymnasium), the built-in library, and episodes sampled under a task's prior.
numpy only."""
