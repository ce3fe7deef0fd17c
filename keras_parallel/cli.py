"""`python -m keras_parallel.cli`: the `keras-parallel` command (see `keras_parallel_cli`).

The command lives in the top-level module `keras_parallel_cli`, so that `--help`
and argument errors answer without importing this package (which imports
Keras and TensorFlow).
"""

from keras_parallel_cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
