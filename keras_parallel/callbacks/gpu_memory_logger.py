"""GPUMemoryLogger: per-device memory in `logs`, every epoch or every N batches."""

from __future__ import annotations

import importlib.util
import math
import os

from keras_parallel import _validation
from keras_parallel._compat import keras
from keras_parallel._warnings import warn
from keras_parallel.callbacks._order import move_to_front
from keras_parallel.devices import canonical_device_name
from keras_parallel.memory import (
    MIB,
    HostSource,
    MemorySource,
    NVMLSource,
    default_source,
)

__all__ = ["GPUMemoryLogger"]


def _prefix(device: str) -> str:
    """ "/device:GPU:1" -> "gpu1"."""
    _, kind, index = canonical_device_name(device).split(":")
    return f"{kind.lower()}{index}"


class GPUMemoryLogger(keras.callbacks.Callback):
    """Logs each accelerator's memory (now, peak, limit) into `logs`, in MiB.

    At the end of every epoch, and every `every_n_batches` training batches
    when asked, the callback reads each device's memory and writes it into
    `logs`, so `History`, `CSVLogger`, `TensorBoard` and the progress bar show
    it, whatever their place in the callback list: at the start of training the
    logger moves itself to the front of `fit`'s callbacks. Per device ``i`` (its
    index in the framework):

    - ``gpu{i}_current_mib``: in use now.
    - ``gpu{i}_peak_mib``: the most in use since the last reading. In epoch
      logs it is the peak over the epoch. The peak is reset after each reading
      where the backend allows (TensorFlow, torch); JAX cannot reset it, so
      there it is the peak since the process started.
    - ``gpu{i}_limit_mib``: what the device may use (a logical device's
      configured limit, else the card's total), where known.
    - ``gpu{i}_nvml_used_mib``: the whole card as NVML sees it (all processes,
      the framework's reserved pool), when nvidia-ml-py and a driver are there.
    - ``gpu_peak_skew``: with two or more devices, (max - min) / mean of the
      devices' peaks: 0 when data-parallel work is balanced.
    - ``host_rss_mib``: the process's resident memory (psutil), always.

    Figures are MiB (2**20 bytes), Python floats, never summed across
    devices. A device named in `devices` but without figures (a CPU, unless
    TensorFlow started with ``TF_CPU_ALLOCATOR_USE_BFC=true``) is left out,
    with a warning; devices that share one allocator (TensorFlow's logical
    CPUs) are logged once, under the first one's name. The key set is fixed
    at the start of training, so every epoch has the same keys (a failed
    reading later gives NaN). With no GPU at all the logs hold
    ``host_rss_mib`` only, and the callback warns once.

    When a device's peak passes `headroom_threshold` of its limit, the
    callback warns once per device and run, with the figures and a gradient
    accumulation factor that should bring it back below. At the end of
    training, `summary` holds each device's peak over the run, limit and
    headroom, and `epoch_peaks` the peak of each epoch; with `plot_path` the
    peaks per epoch are drawn into a PNG (needs matplotlib), which also says
    which devices share a line and which have none.

    Like Keras's own callbacks it has no `get_config`: callbacks are not
    saved with a model, and a memory source cannot be written into a config.

    Without `every_n_batches` the callback has no batch hook, so Keras keeps
    dispatching batch callbacks asynchronously. With `steps_per_execution=k`
    batch hooks fire once per k steps; a reading is taken at the first hook
    at or after each multiple of `every_n_batches`.

    Args:
        every_n_batches: int or None. Also read (and write into the batch
            logs) every this many training batches. Defaults to `None`
            (epoch ends only).
        headroom_threshold: float in (0, 1] or None. Warn when a peak passes
            this fraction of the device's limit; None turns the warning off.
            Defaults to `0.9`.
        plot_path: str or None. Where to save a PNG of each device's peak per
            epoch at the end of training. Defaults to `None` (no plot).
        devices: list of str or None. Devices to measure, e.g.
            ``["/gpu:0", "/gpu:1"]``. Defaults to `None`: every GPU the memory
            source lists.
        source: `keras_parallel.memory.MemorySource` or None. Where the
            figures come from. Defaults to `None`: the backend's allocator
            (TensorFlow, JAX or torch).
        nvml: bool or `keras_parallel.memory.MemorySource`. Log whole-card
            figures from NVML where available; a source replaces NVML (for
            tests). Defaults to `True`.
        verbose: int. 1 prints the per-device summary at the end of training.
            Defaults to `0`.

    Raises:
        ValueError: for `every_n_batches` not a positive int or None,
            `headroom_threshold` outside (0, 1], or a bad device name.
        ImportError: when `plot_path` is given and matplotlib is missing.

    Example:

    ```python
    logger = keras_parallel.callbacks.GPUMemoryLogger(every_n_batches=50)
    history = model.fit(
        x, y, epochs=3,
        callbacks=[logger, keras.callbacks.CSVLogger("train.csv")],
    )
    history.history["gpu0_peak_mib"]
    ```
    """

    def __init__(
        self,
        every_n_batches: int | None = None,
        headroom_threshold: float | None = 0.9,
        plot_path: str | os.PathLike | None = None,
        devices: list[str] | None = None,
        source: MemorySource | None = None,
        nvml: bool | MemorySource = True,
        verbose: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        every_n_batches = _validation.validate_positive_int(
            every_n_batches, "every_n_batches", allow_none=True
        )
        headroom_threshold = _validation.validate_fraction(
            headroom_threshold, "headroom_threshold", allow_none=True
        )
        devices = _validation.validate_devices(
            devices, "devices", allow_none=True, allow_empty=True
        )
        _validation.validate_memory_source(source, "source", allow_none=True)
        _validation.validate_memory_source(nvml, "nvml", allow_bool=True)
        if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
            raise ImportError(
                "`plot_path` needs matplotlib. Install it with "
                "`pip install 'keras-parallel[plot]'` or leave `plot_path=None`."
            )
        self.every_n_batches = every_n_batches
        self.headroom_threshold = headroom_threshold
        self.plot_path = None if plot_path is None else os.fspath(plot_path)
        self.devices = devices
        self.source = source
        self.nvml = nvml
        self.verbose = verbose
        self.summary: dict[str, dict[str, float | None]] = {}
        self.epoch_peaks: dict[str, list[float]] = {}
        self._warned_no_device = False
        self._host = None
        self._nvml_source = None
        if self.every_n_batches is not None:
            # Bound only when asked for: Keras (3 and tf-keras) looks at whether
            # `on_train_batch_end` is overridden to decide whether to call batch
            # hooks at all, and Keras 3 dispatches them asynchronously otherwise.
            self.on_train_batch_end = self._on_train_batch_end

    # -- set-up ------------------------------------------------------------

    def on_train_begin(self, logs=None):
        # Ahead of the callbacks that read the logs (CSVLogger, TensorBoard,
        # EarlyStopping), whatever the order they were listed in.
        move_to_front(self)
        self._allocator = self.source if self.source is not None else default_source()
        if self._host is None:
            self._host = HostSource()
        wanted = self.devices if self.devices is not None else self._safe_devices(self._allocator)
        # Devices that share one allocator have the same figures: log them once.
        self._shared: dict[str, list[str]] = {}  # first device -> every device of its allocator
        first_of: dict[str, str] = {}
        for device in wanted:
            allocator = self._allocator_of(device)
            if allocator in first_of:
                self._shared[first_of[allocator]].append(device)
            else:
                first_of[allocator] = device
                self._shared[device] = [device]
        self._tracked: list[tuple[str, str]] = []  # (device, key prefix)
        self._limits: dict[str, int] = {}
        self._left_out: list[str] = []
        unreadable = []
        for device in self._shared:
            try:
                reading = self._allocator.read(device)
            except Exception as error:
                unreadable.append(f"{device} ({type(error).__name__}: {error})")
                self._left_out.extend(self._shared[device])
                continue
            self._tracked.append((device, _prefix(device)))
            if reading.limit_bytes:
                self._limits[device] = int(reading.limit_bytes)
        if unreadable:
            warn(
                "GPUMemoryLogger: no memory figures for "
                + "; ".join(unreadable)
                + ". These devices are left out of the logs."
            )
        if not self._tracked and not self._warned_no_device:
            self._warned_no_device = True
            warn(
                "GPUMemoryLogger: no GPU with memory figures was found, so only "
                "`host_rss_mib` is logged."
            )
        self._nvml_tracked: list[tuple[str, str]] = []  # (physical device, key prefix)
        nvml = self._resolve_nvml()
        if nvml is not None and self._tracked:
            listed = set(self._safe_devices(nvml))
            for device, prefix in self._tracked:
                if ":GPU:" not in device:
                    continue
                physical = self._allocator.physical_device(device)
                if physical not in listed:
                    continue
                try:
                    nvml.read(physical)
                except Exception:
                    continue
                self._nvml_tracked.append((physical, prefix))
        self._can_reset = {d: self._allocator.reset_peak(d) for d, _ in self._tracked}
        self._run_peak = {d: 0 for d, _ in self._tracked}
        self._epoch_peak = {d: 0 for d, _ in self._tracked}
        self.epoch_peaks = {prefix: [] for _, prefix in self._tracked}
        self.summary = {}
        self._headroom_warned: set[str] = set()
        self._next_batch_reading = self.every_n_batches

    def _resolve_nvml(self):
        if self.nvml is False:
            return None
        if self.nvml is not True:
            return self.nvml
        if self._nvml_source is None:
            self._nvml_source = NVMLSource()
        return self._nvml_source

    def _allocator_of(self, device: str) -> str:
        try:
            return canonical_device_name(self._allocator.allocator(device))
        except Exception:  # a source without `allocator`, or one that fails
            return device

    @staticmethod
    def _safe_devices(source) -> list[str]:
        try:
            return [canonical_device_name(d) for d in source.devices()]
        except Exception:
            return []

    # -- readings ----------------------------------------------------------

    def _read(self) -> dict[str, float]:
        """One reading of every tracked device; resets the peaks it can."""
        values: dict[str, float] = {}
        peaks = []
        for device, prefix in self._tracked:
            try:
                reading = self._allocator.read(device)
                current, peak = int(reading.current_bytes), int(reading.peak_bytes)
            except Exception:
                current = peak = None
            if self._can_reset[device]:
                self._allocator.reset_peak(device)
            if peak is None:
                values[f"{prefix}_current_mib"] = math.nan
                values[f"{prefix}_peak_mib"] = math.nan
            else:
                values[f"{prefix}_current_mib"] = current / MIB
                values[f"{prefix}_peak_mib"] = peak / MIB
                self._epoch_peak[device] = max(self._epoch_peak[device], peak)
                self._run_peak[device] = max(self._run_peak[device], peak)
                peaks.append(peak)
                self._check_headroom(device, peak)
            if device in self._limits:
                values[f"{prefix}_limit_mib"] = self._limits[device] / MIB
        for physical, prefix in self._nvml_tracked:
            try:
                used = self._nvml_source_in_use().read(physical).current_bytes / MIB
            except Exception:
                used = math.nan
            values[f"{prefix}_nvml_used_mib"] = float(used)
        if len(self._tracked) >= 2:
            values["gpu_peak_skew"] = _skew(peaks) if len(peaks) == len(self._tracked) else math.nan
        values["host_rss_mib"] = self._host.read().current_bytes / MIB
        return values

    def _nvml_source_in_use(self):
        return self.nvml if not isinstance(self.nvml, bool) else self._nvml_source

    def _check_headroom(self, device: str, peak: int) -> None:
        limit = self._limits.get(device)
        if self.headroom_threshold is None or not limit or device in self._headroom_warned:
            return
        if peak <= self.headroom_threshold * limit:
            return
        self._headroom_warned.add(device)
        # Activations grow with the batch; weights and optimizer state do not,
        # so this factor is a lower bound: round it up to a power of two.
        factor = 2 ** math.ceil(math.log2(peak / (self.headroom_threshold * limit)))
        factor = max(factor, 2)
        warn(
            f"GPUMemoryLogger: device {device} peaked at {peak / MIB:.1f} MiB, "
            f"{peak / limit:.0%} of its {limit / MIB:.1f} MiB limit (threshold "
            f"{self.headroom_threshold:.0%}). An out-of-memory error is near: split "
            f"each batch into at least {factor} micro-batches with gradient "
            f"accumulation (keras_parallel GradientAccumulation with a micro-batch of "
            f"batch_size // {factor}), or lower the batch size on this device."
        )

    # -- hooks -------------------------------------------------------------

    def on_epoch_begin(self, epoch, logs=None):
        self._next_batch_reading = self.every_n_batches
        for device in self._epoch_peak:
            self._epoch_peak[device] = 0

    def _on_train_batch_end(self, batch, logs=None):
        """Bound as `on_train_batch_end` only when `every_n_batches` is set."""
        if batch + 1 < self._next_batch_reading:
            return
        logs = logs if logs is not None else {}
        # With steps_per_execution=k the hook sees every k-th batch: read at
        # the first hook at or after each multiple of `every_n_batches`.
        n = self.every_n_batches
        self._next_batch_reading = ((batch + 1) // n + 1) * n
        logs.update(self._read())

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        values = self._read()
        # In epoch logs the peak is the peak over the whole epoch, batch
        # readings included.
        peaks = []
        for device, prefix in self._tracked:
            if not math.isnan(values[f"{prefix}_peak_mib"]):
                values[f"{prefix}_peak_mib"] = self._epoch_peak[device] / MIB
                peaks.append(self._epoch_peak[device])
            self.epoch_peaks[prefix].append(values[f"{prefix}_peak_mib"])
        if len(self._tracked) >= 2 and len(peaks) == len(self._tracked):
            values["gpu_peak_skew"] = _skew(peaks)
        logs.update(values)

    def on_train_end(self, logs=None):
        self.summary = {}
        for device, prefix in self._tracked:
            peak = self._run_peak[device] / MIB
            limit = self._limits.get(device)
            limit_mib = None if limit is None else limit / MIB
            self.summary[prefix] = {
                "device": device,
                "devices": list(self._shared[device]),
                "peak_mib": peak,
                "limit_mib": limit_mib,
                "headroom_mib": None if limit_mib is None else limit_mib - peak,
                "headroom_fraction": None if limit_mib is None else 1 - peak / limit_mib,
            }
        if self.verbose:
            print(self.summary_text())
        if self.plot_path is not None and self.epoch_peaks:
            self.save_plot(self.plot_path)

    # -- reporting ---------------------------------------------------------

    def summary_text(self) -> str:
        """The per-device summary of the last run as a small table."""
        if not self.summary:
            return "GPUMemoryLogger: no GPU was measured."
        lines = ["GPUMemoryLogger summary (MiB):", "device  peak  limit  headroom"]
        for prefix, row in self.summary.items():
            limit = "n/a" if row["limit_mib"] is None else f"{row['limit_mib']:.1f}"
            headroom = (
                "n/a"
                if row["headroom_mib"] is None
                else f"{row['headroom_mib']:.1f} ({row['headroom_fraction']:.0%})"
            )
            name = prefix
            if len(row["devices"]) > 1:
                name += f" (one allocator for {', '.join(map(_prefix, row['devices']))})"
            lines.append(f"{name}  {row['peak_mib']:.1f}  {limit}  {headroom}")
        return "\n".join(lines)

    def _plot_notes(self) -> list[str]:
        """What the plot says about devices that have no line of their own."""
        notes = []
        for device, _ in self._tracked:
            shared = [_prefix(d) for d in self._shared[device]]
            if len(shared) > 1:
                why = "share one allocator"
                if all(":CPU:" in d for d in self._shared[device]):
                    why = "are logical devices of one CPU and share its allocator"
                notes.append(
                    f"{', '.join(shared[:-1])} and {shared[-1]} {why}, so one line "
                    f"({shared[0]}) shows them all."
                )
        if self._left_out:
            notes.append(
                "Not plotted (no memory figures, see the warning): "
                + ", ".join(map(_prefix, self._left_out))
                + "."
            )
        return notes

    def save_plot(self, path: str | os.PathLike):
        """Draws each device's peak per epoch (and its limit) into a PNG at `path`.

        A device without a line of its own (it shares an allocator with
        another, or has no figures) is named in a note under the plot.

        Returns:
            The `matplotlib.figure.Figure` that was saved.
        """
        from matplotlib.figure import Figure

        notes = self._plot_notes()
        height = 3.6 + 0.25 * len(notes)
        figure = Figure(figsize=(7.5, height), dpi=100)
        axes = figure.add_subplot()
        for index, (device, prefix) in enumerate(self._tracked):
            peaks = self.epoch_peaks.get(prefix, [])
            color = f"C{index}"
            epochs = range(1, len(peaks) + 1)
            shared = [_prefix(d) for d in self._shared[device]]
            label = f"{prefix} peak"
            if len(shared) > 1:
                label += f" (shared by {', '.join(shared)})"
            axes.plot(epochs, peaks, marker="o", color=color, label=label)
            if device in self._limits:
                axes.axhline(
                    self._limits[device] / MIB,
                    color=color,
                    linestyle="--",
                    linewidth=1,
                    label=f"{prefix} limit",
                )
        axes.set_xlabel("epoch")
        axes.set_ylabel("MiB (2**20 bytes)")
        axes.set_title("Peak memory per epoch")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        if self._tracked:
            axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
        bottom = 0.0
        if notes:
            line = 0.25 / height  # one line of notes, as a fraction of the figure
            bottom = line * (len(notes) + 0.5)
            for i, note in enumerate(notes):
                figure.text(0.01, line * (len(notes) - i - 0.5), note, fontsize="small")
        figure.tight_layout(rect=(0, bottom, 1, 1))
        figure.savefig(os.fspath(path), format="png")
        return figure


def _skew(peaks: list[int]) -> float:
    """(max - min) / mean of the peaks; 0 when they are all 0."""
    mean = sum(peaks) / len(peaks)
    return 0.0 if mean == 0 else float((max(peaks) - min(peaks)) / mean)
