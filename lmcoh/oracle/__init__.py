"""The exact oracle (`exact`): soft values, the goal-conditioning operator G, temperature,
folded and cumulative sequences, success, return, incoherence, Boltzmann iteration; and the
optimum of KL-regularised RL (`klrl`). numpy only."""
