"""Data-parallel training on the engines Keras runs on: which engine, how many replicas, who writes.

``TrainConfig.distribute`` (``--distribute``, notebook 03's ``DISTRIBUTE``) is one of:

- ``"off"``: one device (the default).
- ``"auto"``: ``"mirrored"`` (TensorFlow) or ``"jax_dataparallel"`` (JAX) when this machine has
  more than one accelerator, else ``"off"``.
- ``"mirrored"`` (TensorFlow): ``tf.distribute.MirroredStrategy`` over this machine's GPUs; without
  a GPU over its CPU devices (``COVIDLIB_TF_LOGICAL_CPUS=N`` splits the CPU into N logical
  devices: tests and CPU-only trials).
- ``"multiworker"`` (TensorFlow): ``tf.distribute.MultiWorkerMirroredStrategy``, the cluster and
  this worker's place in it read from ``TF_CONFIG``.
- ``"jax_dataparallel"`` (JAX): ``keras.distribution.DataParallel`` over every device of every
  process; several processes (``keras.distribution.initialize``, i.e.
  ``jax.distributed.initialize``) when ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` /
  ``KERAS_DISTRIBUTION_NUM_PROCESSES`` / ``KERAS_DISTRIBUTION_PROCESS_ID`` or
  ``JAX_COORDINATOR_ADDRESS`` are set.

The same rules hold on every engine. ``batch_size`` is per replica and the global batch is
``batch_size x replicas``. The learning rate is used as given, for the global batch
(:data:`LR_RULE`). Batch-norm statistics come from the whole global batch (TensorFlow:
``synchronized`` batch norm while training; JAX: the sharded program computes what the
single-device one does). So a run with the same seed and global batch follows the single-device
run up to floating-point summation order: on JAX with augmentation and dropout too, on TensorFlow
without them (each TensorFlow replica draws its own random numbers). JAX splits every batch
evenly over its devices: the last training batch of an epoch loses up to ``replicas - 1``
images, the last validation batch is padded (:class:`covidlib.arraystore.ArrayLoader`). Only the chief
(TensorFlow task 0, JAX process 0) writes into the model folder.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import keras

# Keras is imported where it is used: the CLI reads CHOICES without starting it.
CHOICES = ("auto", "off", "mirrored", "multiworker", "jax_dataparallel")
# The Keras backend each explicit engine runs on.
ENGINE_BACKEND = {"mirrored": "tensorflow", "multiworker": "tensorflow", "jax_dataparallel": "jax"}
LR_RULE = "none: learning_rate is used as given for the global batch (batch_size x replicas)"
TF_LOGICAL_CPUS = "COVIDLIB_TF_LOGICAL_CPUS"
JAX_PROCESS_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "JAX_COORDINATOR_ADDRESS")

# Engines are made once per process: a second MultiWorkerMirroredStrategy or
# jax.distributed.initialize in the same process is refused by TensorFlow / JAX.
_ENGINES: dict[str, Any] = {}


def check_choice(choice: str, backend: str) -> None:
    """Raise a one-line ValueError when ``choice`` is unknown or needs another Keras backend."""
    if choice not in CHOICES:
        raise ValueError(f"distribute must be one of {', '.join(CHOICES)}; got {choice!r}")
    need = ENGINE_BACKEND.get(choice)
    if need and need != backend:
        mine = [c for c, b in ENGINE_BACKEND.items() if b == backend]
        hint = f" (with {backend} use {' or '.join(mine)})" if mine else ""
        raise ValueError(f"distribute={choice!r} needs KERAS_BACKEND={need}, but the active Keras "
                         f"backend is {backend}{hint}")


@dataclass
class Plan:
    """The resolved engine of one training run.

    Attributes:
        mode: ``"off"``, ``"mirrored"``, ``"multiworker"`` or ``"jax_dataparallel"``.
        requested: the ``distribute`` value asked for (``"auto"`` resolves to a mode).
        replicas: devices that each take a share of the global batch, over all workers.
        workers: processes taking part (1 on one machine).
        worker_index: this process's index (0 = the chief).
        engine: the ``tf.distribute.Strategy`` or ``keras.distribution.DataParallel``.
    """

    mode: str = "off"
    requested: str = "off"
    replicas: int = 1
    workers: int = 1
    worker_index: int = 0
    engine: Any = None

    @property
    def distributed(self) -> bool:
        return self.mode != "off"

    @property
    def is_chief(self) -> bool:
        """Whether this process writes checkpoints, logs, history, predictions and the model."""
        return self.worker_index == 0

    @property
    def tf_strategy(self) -> bool:
        return self.mode in ("mirrored", "multiworker")

    def record(self, batch_size: int) -> dict[str, Any]:
        """What ``config.json`` records about the engine, besides ``distribute`` itself."""
        return {"distribute_mode": self.mode, "replicas": self.replicas, "workers": self.workers,
                "global_batch": int(batch_size) * self.replicas, "lr_rule": LR_RULE}

    def loader_options(self, training: bool) -> dict[str, Any]:
        """:class:`covidlib.arraystore.ArrayLoader` options for this engine's batches.

        TensorFlow splits each global batch over replicas and workers itself (its ``DATA``
        auto-sharding), so its loaders serve whole global batches. JAX needs batches that split
        evenly over its devices, and each process feeds only its own share.
        """
        if self.mode != "jax_dataparallel":
            return {}
        return {"multiple": self.replicas, "shard": (self.worker_index, self.workers),
                "pad": not training}

    def active(self) -> contextlib.AbstractContextManager:
        """Held while a model is built and trained: JAX's distribution is current inside."""
        return self.engine.scope() if self.mode == "jax_dataparallel" else contextlib.nullcontext()

    def variable_scope(self) -> contextlib.AbstractContextManager:
        """Where variables are made (model, optimizer, restore): TensorFlow's strategy scope."""
        return self.engine.scope() if self.tf_strategy else contextlib.nullcontext()

    @contextlib.contextmanager
    def host_io(self) -> Iterator[None]:
        """Writing files from inside ``fit`` on one worker only, with no collective operation.

        Under a JAX distribution, Keras' weight saving makes a throw-away optimizer whose
        variables would be placed on every process's devices - a step the other processes
        never join. Reading replicated variables needs no other process.
        """
        if self.mode != "jax_dataparallel":
            yield
            return
        from keras import distribution as kd

        current = kd.distribution()
        kd.set_distribution(None)
        try:
            yield
        finally:
            kd.set_distribution(current)

    @contextlib.contextmanager
    def batchnorm_sync(self, model: keras.Model) -> Iterator[None]:
        """Batch-norm statistics over the global batch while training with TensorFlow replicas.

        ``synchronized`` is switched back off afterwards: the saved model stays the
        single-device model.
        """
        import keras

        layers = [layer for layer in _all_layers(model)
                  if isinstance(layer, keras.layers.BatchNormalization)]
        if not (self.tf_strategy and self.replicas > 1):
            layers = []
        before = [layer.synchronized for layer in layers]
        for layer in layers:
            layer.synchronized = True
        try:
            yield
        finally:
            for layer, value in zip(layers, before):
                layer.synchronized = value

    def barrier(self, name: str) -> None:
        """Wait until every worker gets here (a no-op with one worker)."""
        if self.workers == 1:
            return
        if self.mode == "jax_dataparallel":
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)
            return
        import tensorflow as tf

        strategy = self.engine
        # A one-number all-reduce: it completes only when every worker has joined it.
        tf.function(lambda: strategy.reduce("SUM", strategy.run(lambda: tf.ones(())), axis=None),
                    autograph=False)()


def _all_layers(model: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """Every layer of a model, nested models included (public ``layers`` attributes only)."""
    stack = [model]
    while stack:
        layer = stack.pop()
        yield layer
        stack.extend(getattr(layer, "layers", []) or [])


def plan(choice: str) -> Plan:
    """Resolve ``choice`` into an engine, creating it (once per process).

    Call it before anything else runs on TensorFlow or JAX: a multi-worker engine and logical
    CPU devices can only be set up before the runtime starts.
    """
    import keras

    backend = keras.backend.backend()
    check_choice(choice, backend)
    mode = _auto_mode(backend) if choice == "auto" else choice
    if mode == "off":
        return Plan(requested=choice)
    if mode == "jax_dataparallel":
        return _jax_plan(choice)
    return _tf_plan(mode, choice)


def _auto_mode(backend: str) -> str:
    """``"auto"``: every local accelerator when there is more than one."""
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "off"
        if backend == "jax":
            import jax

            accelerators = [d for d in jax.local_devices() if d.platform != "cpu"]
            return "jax_dataparallel" if len(accelerators) > 1 else "off"
    except Exception:  # noqa: BLE001 - no accelerator runtime: one device
        return "off"
    return "off"


def _tf_plan(mode: str, requested: str) -> Plan:
    if mode == "multiworker":
        strategy = _ENGINES.get(mode) or _multi_worker_strategy()
        _ENGINES[mode] = strategy
        workers, index = _tf_worker_place(strategy)
        return Plan(mode, requested, strategy.num_replicas_in_sync, workers, index, strategy)
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        _split_cpu(int(os.environ.get(TF_LOGICAL_CPUS, "0") or 0))
    devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
    key = f"mirrored:{','.join(devices)}"
    _ENGINES[key] = strategy = _ENGINES.get(key) or tf.distribute.MirroredStrategy(devices)
    if strategy.num_replicas_in_sync == 1:
        warnings.warn("distribute='mirrored' found one device: training runs on it alone",
                      UserWarning, stacklevel=3)
    return Plan(mode, requested, strategy.num_replicas_in_sync, 1, 0, strategy)


def _split_cpu(n: int) -> None:
    """Split the CPU into ``n`` logical TensorFlow devices (before TensorFlow starts)."""
    if n <= 1:
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as exc:
        raise RuntimeError(f"{TF_LOGICAL_CPUS}={n}: TensorFlow already started in this process; "
                           "set it before the first training (a fresh process)") from exc


def _multi_worker_strategy():
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` takes what Keras 3's ``fit`` gives it.

    Keras 3.15 (``TensorFlowTrainer``) calls ``Strategy.reduce`` with a whole ``(x, y)`` batch
    to learn its shapes and with per-replica scalars and ``axis=0`` for the logs; the
    multi-worker strategy accepts neither (keras-team/keras#20585), nor ``uint8`` images in its
    collectives. This subclass reduces each element with the strategy's own collective,
    in ``float32`` when the collective cannot take the type; nothing else changes.
    """
    if not os.environ.get("TF_CONFIG"):
        raise ValueError("distribute='multiworker' needs TF_CONFIG (the cluster and this worker's "
                         "index); see the README, or use 'mirrored' on one machine")
    import tensorflow as tf

    reducible = (tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.int32, tf.int64)

    class KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis=None):
            if isinstance(value, (tuple, list, dict)):
                return tf.nest.map_structure(lambda v: self.reduce(reduce_op, v, axis), value)
            local = self.experimental_local_results(value)[0]
            if axis is not None and local.shape.rank == 0:
                axis = None  # a scalar per replica has no axis 0: reduce across replicas only
            if local.dtype in reducible:
                return super().reduce(reduce_op, value, axis)
            as_float = tf.function(lambda v: self.run(lambda t: tf.cast(t, tf.float32), args=(v,)),
                                   autograph=False)
            return tf.cast(super().reduce(reduce_op, as_float(value), axis), local.dtype)

    try:
        return KerasMultiWorkerMirroredStrategy()
    except RuntimeError as exc:  # TensorFlow's runtime already started in this process
        raise RuntimeError(f"distribute='multiworker' must start before TensorFlow runs anything "
                           f"in this process: start each worker fresh (e.g. `covidlib train`) "
                           f"({exc})") from exc


def _tf_worker_place(strategy) -> tuple[int, int]:
    """(workers, this worker's index); the chief is index 0 (``chief`` task, else worker 0)."""
    resolver = strategy.cluster_resolver
    jobs = resolver.cluster_spec().as_dict()
    chiefs = len(jobs.get("chief", []))
    workers = chiefs + len(jobs.get("worker", []))
    if resolver.task_type == "chief":
        return workers, 0
    return workers, chiefs + int(resolver.task_id or 0)


def _jax_plan(requested: str) -> Plan:
    import jax
    import keras

    if "jax" not in _ENGINES:
        processes = int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1") or 1)
        if (processes > 1 or any(os.environ.get(v) for v in JAX_PROCESS_VARIABLES)) and \
                not jax.distributed.is_initialized():
            try:
                keras.distribution.initialize()
            except RuntimeError as exc:
                raise RuntimeError(f"multi-process JAX training could not start ({exc}); start "
                                   "each process fresh (e.g. with `covidlib train`), before "
                                   "anything runs on JAX") from exc
        devices = jax.devices()
        distribution = keras.distribution.DataParallel(devices=devices)
        # Each process's loader already serves only its own share of every global batch.
        distribution.auto_shard_dataset = False
        _ENGINES["jax"] = distribution
    distribution = _ENGINES["jax"]
    return Plan("jax_dataparallel", requested, len(jax.devices()), jax.process_count(),
                jax.process_index(), distribution)
