"""Layers of keras_parallel."""

from keras_parallel.layers.batch_slice import BatchSlice

__all__ = ["BatchSlice"]
