"""keras_parallel: train Keras models with a bigger batch than one GPU holds."""

from keras_parallel import callbacks
from keras_parallel._compat import FLAVOUR

__version__ = "0.1.0"

__all__ = ["callbacks", "FLAVOUR", "__version__"]
