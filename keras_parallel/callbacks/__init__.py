"""Callbacks for `fit`: memory per device, gradient accumulation, template checkpoints."""

from keras_parallel.callbacks.gpu_memory_logger import GPUMemoryLogger
from keras_parallel.callbacks.gradient_accumulation import GradientAccumulation
from keras_parallel.callbacks.template_checkpoint import TemplateCheckpoint

__all__ = ["GPUMemoryLogger", "GradientAccumulation", "TemplateCheckpoint"]
