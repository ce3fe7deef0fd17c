"""Several machines: one `MultiWorkerMirroredStrategy` replica per worker.

`strategy()` builds TensorFlow's own multi-worker engine,
`tf.distribute.MultiWorkerMirroredStrategy` (MWMS), from the cluster described in
`TF_CONFIG`, with **one replica per worker**: the worker's first GPU (its CPU
without one). MWMS all-reduces the gradients across workers once per step; a
`keras_parallel.DataParallel` model built inside `strategy.scope()` spreads each
worker's part of the batch over that worker's own devices (all its GPUs, or the
logical CPUs of `split_cpu`), with that worker's own split. Left to itself, MWMS
makes one replica per GPU, and a DataParallel model inside each replica would
slice over every GPU again.

TensorFlow backend only (Keras 3 on TensorFlow, or tf-keras). On JAX, Keras's
own `keras.distribution` trains over several processes, and DataParallel and
GradientAccumulation run inside it; `check_fit_supported` checks, before any
data is read, that every process cuts its rows alike. See the documentation's
"Several machines" page.
"""

from __future__ import annotations

import json
import os

from keras_parallel import _backend
from keras_parallel._compat import IS_KERAS_3, backend_name, keras

__all__ = ["check_fit_supported", "cluster_resolver", "is_multi_worker", "strategy"]

_COMMUNICATIONS = ("auto", "ring", "nccl")


def _tensorflow():
    if backend_name() != "tensorflow":
        raise NotImplementedError(
            "keras_parallel.multi_worker builds TensorFlow's MultiWorkerMirroredStrategy. "
            'Expected KERAS_BACKEND="tensorflow" or tf-keras. '
            f"Received: backend={backend_name()!r}"
        )
    import tensorflow as tf

    return tf


def cluster_resolver(tf_config: str | dict | None = None):
    """Returns the cluster resolver `strategy()` uses: TF_CONFIG's cluster, one device per worker.

    A `tf.distribute.cluster_resolver.SimpleClusterResolver` with the cluster,
    task and RPC layer of `tf.distribute.cluster_resolver.TFConfigClusterResolver`
    (which reads `TF_CONFIG`), and ``num_accelerators`` ``{"GPU": 1}`` on a worker
    with a GPU, ``{"GPU": 0}`` (its CPU) without: MWMS makes one replica per
    worker, on that device. Use it to build the strategy yourself (other
    `communication_options`).

    Args:
        tf_config: str, dict or None. The cluster, as `TF_CONFIG` holds it (JSON
            text or its dict). None reads the `TF_CONFIG` environment variable
            (none set: a single worker). Defaults to None.

    Returns:
        A `tf.distribute.cluster_resolver.SimpleClusterResolver`.

    Raises:
        ValueError: if `tf_config` is not valid JSON, or has no `"task"` while its
            cluster has several workers.
        NotImplementedError: on a Keras backend other than TensorFlow.

    Example:

    ```python
    import keras_parallel

    resolver = keras_parallel.multi_worker.cluster_resolver(
        {"cluster": {"worker": ["host0:12345", "host1:12345"]},
         "task": {"type": "worker", "index": 0}}
    )
    resolver.task_id, resolver.num_accelerators()  # (0, {'GPU': 0}) on a CPU machine
    ```
    """
    tf = _tensorflow()
    resolvers = tf.distribute.cluster_resolver
    if tf_config is None:
        text = os.environ.get("TF_CONFIG", "")
        config = {}
        if text.strip():
            config = _parse_tf_config(text)
    elif isinstance(tf_config, str):
        config = _parse_tf_config(tf_config)
    elif isinstance(tf_config, dict):
        config = tf_config
    else:
        raise ValueError(
            "Invalid value for argument `tf_config`. Expected TF_CONFIG's JSON text, "
            f"its dict, or None. Received: tf_config={tf_config!r}"
        )
    cluster = config.get("cluster") or {}
    task = config.get("task") or {}
    workers = sum(len(v) for v in cluster.values())
    if workers > 1 and not task:
        raise ValueError(
            "Invalid value for argument `tf_config`. Expected a cluster with a "
            '"task" entry naming this worker, e.g. {"type": "worker", "index": 0}. '
            f"Received: tf_config={config!r}"
        )
    spec = tf.train.ClusterSpec(cluster)
    rpc_layer = config.get("rpc_layer") or "grpc"
    gpus = 1 if tf.config.list_physical_devices("GPU") else 0
    return resolvers.SimpleClusterResolver(
        spec,
        task_type=task.get("type"),
        task_id=task.get("index"),
        num_accelerators={"GPU": gpus},
        rpc_layer=rpc_layer,
    )


def _parse_tf_config(text: str) -> dict:
    try:
        config = json.loads(text)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ValueError(
            "Invalid value for argument `tf_config` (or the TF_CONFIG environment "
            "variable). Expected JSON like "
            '{"cluster": {"worker": ["host0:port", "host1:port"]}, '
            '"task": {"type": "worker", "index": 0}}. '
            f"Received: tf_config={text!r}"
        )
    return config


def strategy(tf_config: str | dict | None = None, communication: str = "auto", timeout=None):
    """Returns a `tf.distribute.MultiWorkerMirroredStrategy` with one replica per worker.

    Run the same script on every machine, each with its own `TF_CONFIG` (the
    same cluster, its own task index). Create the strategy first, before
    anything else uses TensorFlow (after `keras_parallel.split_cpu`, which must
    come before it), then build, compile and fit everything inside
    `strategy.scope()`. `fit`'s `batch_size` is the global batch: each worker
    takes ``batch_size / workers`` rows of each batch, and a DataParallel model
    splits those over the worker's devices.

    Without `TF_CONFIG` (one machine) the strategy has one worker, so the same
    script runs on one machine and on several.

    Args:
        tf_config: str, dict or None. The cluster, as `TF_CONFIG` holds it. None
            reads the `TF_CONFIG` environment variable. Defaults to None.
        communication: str. The cross-worker all-reduce: `"auto"`, `"ring"`
            (gRPC, any device) or `"nccl"` (GPUs). Defaults to `"auto"`.
        timeout: float or None. Seconds after which a collective operation that
            waits for a worker fails ("Collective has timed out") instead of
            waiting forever. Defaults to None (no timeout).

    Returns:
        A `tf.distribute.MultiWorkerMirroredStrategy`: one replica per worker, on
        the worker's first GPU, or on its CPU without one.

    Raises:
        ValueError: for an invalid argument or `TF_CONFIG`.
        NotImplementedError: on a Keras backend other than TensorFlow.

    Example:

    ```python
    import keras_parallel

    keras_parallel.split_cpu(2)  # only to try it on CPUs: before the strategy
    strategy = keras_parallel.multi_worker.strategy()
    with strategy.scope():
        model = keras_parallel.DataParallel(make_model())
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(dataset, epochs=3)  # dataset batched with the global batch size
    ```
    """
    tf = _tensorflow()
    if communication not in _COMMUNICATIONS:
        raise ValueError(
            "Invalid value for argument `communication`. Expected one of "
            f"{list(_COMMUNICATIONS)}. Received: communication={communication!r}"
        )
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise ValueError(
            "Invalid value for argument `timeout`. Expected a positive number of "
            f"seconds or None. Received: timeout={timeout!r}"
        )
    implementation = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[communication]
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=implementation, timeout_seconds=timeout
    )
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=cluster_resolver(tf_config), communication_options=options
    )


def is_multi_worker(distribute_strategy) -> bool:
    """Whether `distribute_strategy` is a `MultiWorkerMirroredStrategy` with several workers.

    Example:

    ```python
    import keras_parallel
    import tensorflow as tf

    keras_parallel.multi_worker.is_multi_worker(tf.distribute.get_strategy())  # False
    ```
    """
    if backend_name() != "tensorflow" or distribute_strategy is None:
        return False
    tf = _tensorflow()
    if not isinstance(distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = getattr(distribute_strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return sum(len(v) if isinstance(v, list | dict) else 1 for v in spec.values()) > 1


def check_fit_supported(model) -> None:
    """Raises a clear error where Keras cannot `fit` `model` on several workers.

    Keras 3 (3.15.1 and before; keras-team/keras#20585, open) fails inside its own
    `fit` under a `MultiWorkerMirroredStrategy` over several workers. tf-keras
    trains there. keras_parallel's DataParallel models call this before `fit`
    reads any data; call it yourself for other models.

    Args:
        model: a Keras model (its `distribute_strategy` is checked).

    On JAX under a `keras.distribution.DataParallel` (one process, or several
    after `keras.distribution.initialize`), a DataParallel model over several
    devices must use all of this process's devices of the distribution's mesh,
    with the same `split` on every process (the step is one program over all).

    Raises:
        NotImplementedError: with Keras 3 under a `MultiWorkerMirroredStrategy`
            over several workers.
        ValueError: on JAX under a distribution, for DataParallel devices other
            than this process's devices of its mesh, a split that differs
            between processes, or a distribution other than
            `keras.distribution.DataParallel`.

    Example:

    ```python
    import keras_parallel

    with strategy.scope():  # keras_parallel.multi_worker.strategy()
        model = make_model()
        model.compile(optimizer="adam", loss="mse")
    keras_parallel.multi_worker.check_fit_supported(model)  # raises on Keras 3
    model.fit(dataset)
    ```
    """
    replicas_layer = getattr(model, "_replicas_layer", None)
    # The backend's own conditions (JAX: a keras.distribution's mesh and split).
    _backend.replicas.check_fit_supported(replicas_layer() if callable(replicas_layer) else None)
    _refuse_keras_3_fit(getattr(model, "distribute_strategy", None), "`fit`")


def _refuse_keras_3_fit(distribute_strategy, what: str) -> None:
    """Raises where Keras 3 on TensorFlow would `fit` under a multi-worker strategy."""
    if not IS_KERAS_3 or not is_multi_worker(distribute_strategy):  # False off TensorFlow
        return
    raise NotImplementedError(
        f"Keras 3 cannot `fit` under a MultiWorkerMirroredStrategy over several "
        f"workers, so {what} cannot run there: Keras's `fit` fails inside Keras "
        "(keras-team/keras#20585), with or without keras_parallel. Expected "
        "tf-keras for several machines: `pip install tf-keras` and set "
        "TF_USE_LEGACY_KERAS=1 before anything imports TensorFlow. "
        f"Received: Keras {keras.__version__}, "
        f"MultiWorkerMirroredStrategy with {distribute_strategy.num_replicas_in_sync} replicas"
    )


def _check_scope_supported(what: str) -> None:
    """Raises, like `check_fit_supported`, inside a multi-worker strategy's scope on Keras 3.

    For objects made before `fit` (`GradientAccumulation`): Keras 3's `fit` fails
    there before any callback is called, so the refusal comes when the object is
    made inside `strategy.scope()`.
    """
    if not IS_KERAS_3 or backend_name() != "tensorflow":
        return
    tf = _tensorflow()
    if tf.distribute.has_strategy():
        _refuse_keras_3_fit(tf.distribute.get_strategy(), what)
