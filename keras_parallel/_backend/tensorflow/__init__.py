"""The TensorFlow backend: Keras 3 on TensorFlow, and tf-keras (Keras 2 on TensorFlow).

Everything that calls TensorFlow directly lives here: device listing, splitting
and placement (`devices`), allocator statistics (`memory`), the speed and peak
probes (`probes`), the accumulation train step and its out-of-memory errors
(`accumulation`), the XLA tracing query (`xla`), and the tensor helpers the
tf-keras flavour uses in place of `keras.ops` (`ops`). The rest of the package
reaches these modules through the dispatcher, `keras_parallel._backend`.
"""
