"""Callbacks for `fit`: memory per device, gradient accumulation, template checkpoints."""
