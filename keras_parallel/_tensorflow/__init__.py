"""TensorFlow-specific code, kept in one package.

Everything that calls TensorFlow directly (device listing and placement under
tf-keras, allocator statistics, the accumulation train step, out-of-memory
errors) lives under ``keras_parallel._tensorflow``. The rest of the package
uses ``keras.ops`` and the helpers in ``keras_parallel.devices``, so that the
JAX and torch backends of Keras 3 can follow.
"""
