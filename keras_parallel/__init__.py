"""keras_parallel: train Keras models with a bigger batch than one GPU holds."""

from keras_parallel import callbacks, multi_worker
from keras_parallel._compat import FLAVOUR
from keras_parallel.devices import split_cpu
from keras_parallel.layers.batch_slice import BatchSlice, slice_sizes
from keras_parallel.layers.parallel_replicas import ParallelReplicas
from keras_parallel.parallel import DataParallel, custom_objects, replicas, unwrap
from keras_parallel.plan import Plan, plan

__version__ = "0.1.0"

__all__ = [
    "BatchSlice",
    "DataParallel",
    "FLAVOUR",
    "ParallelReplicas",
    "Plan",
    "__version__",
    "callbacks",
    "custom_objects",
    "multi_worker",
    "plan",
    "replicas",
    "slice_sizes",
    "split_cpu",
    "unwrap",
]
