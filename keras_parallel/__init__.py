"""keras_parallel: train Keras models with a bigger batch than one GPU holds."""

from keras_parallel import callbacks
from keras_parallel._compat import FLAVOUR
from keras_parallel.layers.batch_slice import BatchSlice, slice_sizes
from keras_parallel.layers.parallel_replicas import ParallelReplicas
from keras_parallel.parallel import DataParallel, custom_objects, replicas, unwrap

__version__ = "0.1.0"

__all__ = [
    "BatchSlice",
    "DataParallel",
    "FLAVOUR",
    "ParallelReplicas",
    "__version__",
    "callbacks",
    "custom_objects",
    "replicas",
    "slice_sizes",
    "unwrap",
]
