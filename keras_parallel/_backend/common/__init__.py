"""What every backend shares: interfaces, device names, memory readings, host and NVML figures.

Modules here import nothing from the rest of keras_parallel but `_compat` and each
other, and no framework at module level. Each module that a backend also has
(`devices`, `memory`, `probes`, `accumulation`) holds the generic behaviour: what a
Keras backend without its own support here gets (the dispatcher uses them for a
backend it does not know), and what the JAX and torch modules build on.
"""
