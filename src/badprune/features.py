"""The trunk pass: a model's activations at the prune layer over a data set, computed once and cached on disk.

The trunk (input -> prune layer) is the expensive part of the network; the pruning sweep only re-runs the head.
:func:`extract` streams a :class:`badprune.data.Dataset` batch by batch through the trunk (a reader thread
converts the next batches into a few reused buffers while two batches run in parallel) and writes one float32
(N, H, W, C) array. Batches hold at most :data:`MAX_BATCH` images (the activations do not depend on the batch size;
larger ones only cost memory). A model's TensorFlow function is traced once per layer and engine and kept with it.

Engines (``engine=``):

* ``tf`` (default): TensorFlow's activations, computed by prune_ext's native trunk (:mod:`badprune.trunk`: the
  layers fused per image, one image stream per core) for each batch size on which it has reproduced TensorFlow's
  output bit for bit (TensorFlow's kernels run op by op on the first batch of that size that holds at least
  :data:`CHECK_NONZEROS` activations unlike a blank image's); until then, and for good on any difference
  (another CPU's kernels) or for a trunk it cannot run, the traced function as ``tf-function``. Bit-identical to
  ``model.predict``; ``info['trunk']`` tells which computed the activations.
* ``tf-function``: the trunk as a ``tf.function`` with a fixed input signature (oneDNN), two batches in flight
  from two threads. Bit-identical to ``model.predict``.
* ``tf-serial``: the same function, one batch at a time.
* ``tf-xla``: ``tf.function(jit_compile=True)``, two batches in flight.
* ``litert``: the trunk converted to LiteRT (XNNPACK), one single-threaded interpreter per core, each fed by
  its own thread. Within ~1e-6 (relative) of Keras.
* ``predict``: ``keras.Model.predict`` per batch (the reference).

Cache entries (:mod:`badprune.cache`) live in :func:`default_cache_dir` (or ``cache_dir``): ``act-<key>.npy`` plus
a JSON completion marker ``act-<key>.json`` written after it, holding the array's CRC-32; an entry without a marker, or
whose marker, file size or checksum disagrees (a value changed on disk) is rebuilt, the last with a one-line
warning. :func:`detect_scale` keeps its decision (and the accuracies behind it) in ``scale-<key>.json`` beside them.
"""
from __future__ import annotations

from . import _tf  # noqa: F401  (quiet TensorFlow before keras is imported)

import contextlib
import os
import shutil
import queue
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np

from ._console import progress as stage_progress, quiet_fds
from . import cache
from .errors import BadpruneError, warn
from .models import model_digest
from .options import SCALES, scale_value
from ._env import cache_home, cpu_count

ENGINES = ("tf", "tf-function", "tf-serial", "tf-xla", "litert", "predict")
DEFAULT_ENGINE = cache.DEFAULT_ENGINE
DEFAULT_BATCH_SIZE = 128
#: the largest batch the engines run: the activations do not depend on the batch size, and larger batches only
#: cost memory (TensorFlow's buffers grow with the batch: 1024 images hold ~190 MB in conv_1 alone) and time
MAX_BATCH = 128
#: batches in flight for the TensorFlow engines (each call also uses TF's intra-op threads)
WORKERS = 2
#: activations unlike a blank image's that a batch must hold for the native trunk's check against TensorFlow to
#: count (a blank image's output, the biases through the layers, agrees whatever the order of the sums)
CHECK_NONZEROS = 256


def default_cache_dir() -> str:
    """Where activations are cached by default: :func:`badprune._env.cache_home`."""
    return cache_home()


def trunk(model, layer: str) -> keras.Model:
    """A Keras model from the model's input to ``layer``'s output (sharing the model's weights)."""
    if len(model.inputs) != 1:
        raise BadpruneError(f"the model has {len(model.inputs)} inputs", fix="use a model with one image input")
    try:
        out = model.get_layer(layer).output
    except ValueError:
        raise BadpruneError(f"the model has no layer '{layer}'") from None
    except AttributeError as e:
        raise BadpruneError(f"layer '{layer}' has no single output ({e})", fix="pick another --layer") from None
    return keras.Model(model.inputs, out, name=f"trunk_{layer}")


# --------------------------------------------------------------------------------------------------------------
# engines: callables mapping a float32 NHWC batch to a float32 numpy array


class _Runner:
    """Runs a Keras model (trunk or full model) batch by batch with one engine."""

    def __init__(self, net: keras.Model, engine: str | None = None):
        engine = engine or DEFAULT_ENGINE
        if engine not in ENGINES:
            raise BadpruneError(f"unknown engine '{engine}'", fix=f"use one of: {', '.join(ENGINES)}")
        self.net = net
        self.engine = engine
        if engine in ("tf-serial", "predict"):
            self.workers = 1
        elif engine == "litert":  # one single-threaded interpreter per core
            self.workers = max(2, cpu_count())
        else:
            self.workers = WORKERS
        shape = tuple(net.inputs[0].shape[1:])
        if any(s is None for s in shape):
            raise BadpruneError(f"the model input shape {shape} is not fixed", fix="use a model with a fixed input")
        self.input_shape = tuple(int(s) for s in shape)
        self.native = None  # the native trunk while it is used or checked (engine tf)
        self._lock = threading.Lock()
        #: how a batch runs (:meth:`__call__`): 'tf' (the traced function), 'checking' (the native trunk on the
        #: batch sizes proven equal to TensorFlow, :meth:`_checking_call`), 'litert' or 'predict'
        self.path = "predict"
        if engine.startswith("tf"):
            self._fn = None  # the traced function, built on first use
            self.path = "tf"
            if engine == "tf":
                from .trunk import compile_trunk

                self.native = compile_trunk(net)
            if self.native is None:
                self._function()
            else:  # one image stream per core; TensorFlow keeps its two batches in flight
                self.out_shape = tuple(int(s) for s in net.outputs[0].shape[1:])
                self.workers = max(WORKERS, cpu_count())
                self._tf_slots = threading.BoundedSemaphore(WORKERS)
                self._check_lock = threading.Lock()
                self._proven = set()  # batch sizes on which the native trunk reproduced TensorFlow
                self._blank = None  # its output for a blank image (a check must differ from it to count)
                self.path = "checking"
        elif engine == "litert":
            self._blob = self._convert_litert(net)
            self._pool: queue.Queue = queue.Queue()
            for _ in range(self.workers):
                self._pool.put(self._new_interpreter())
            self.path = "litert"

    _tf_slots = contextlib.nullcontext()

    def _function(self):
        """The trunk as a traced TensorFlow function (traced once)."""
        with self._lock:
            if self._fn is None:
                import tensorflow as tf

                net = self.net
                fn = tf.function(lambda x: net(x, training=False), jit_compile=(self.engine == "tf-xla"),
                                 input_signature=[tf.TensorSpec((None,) + self.input_shape, tf.float32)])
                self._fn = fn.get_concrete_function()
        return self._fn

    def _tf_call(self, x):
        fn = self._fn or self._function()
        with self._tf_slots:
            return fn(x).numpy()

    def _native_call(self, native, x):
        out = np.empty((len(x),) + self.out_shape, np.float32)
        native(x, out)
        return out

    def _drop_native(self) -> None:
        self.native, self._proven, self.path = None, set(), "tf"

    def prepare(self) -> None:
        """Before a pass: the native trunk reads the model's current weights (dropped for TensorFlow if one is not
        finite)."""
        if self.native is not None and not self.native.sync():
            self._drop_native()

    def _checking_call(self, x):
        """The native trunk's output for a batch size on which it has reproduced TensorFlow, else TensorFlow's.

        A batch of a size not yet proven runs TensorFlow's kernels op by op (no trace to wait for) and the native
        trunk: equal to the bit, and with at least :data:`CHECK_NONZEROS` activations unlike a blank image's (an
        output the order of the sums cannot change proves nothing), the size is proven; any difference drops the
        native trunk for the traced function for good. oneDNN's kernels (so their order of summing) can depend on
        the batch size, hence a check per size."""
        native = self.native  # once: another thread may drop it meanwhile
        if native is not None and len(x) in self._proven:
            return self._native_call(native, x)
        with self._check_lock:
            native = self.native
            if native is not None and len(x) not in self._proven:
                with warnings.catch_warnings():  # Keras on the input's structure (a list or one tensor)
                    warnings.simplefilter("ignore", UserWarning)
                    y = keras.ops.convert_to_numpy(self.net(x, training=False))
                z = np.empty_like(y)
                if native(x, z) and np.array_equal(z, y):
                    if self._blank is None:
                        self._blank = self._native_call(native, np.zeros((1,) + self.input_shape, np.float32))
                    if np.count_nonzero(y != self._blank) >= CHECK_NONZEROS:
                        self._proven.add(len(x))
                    return y
                self._drop_native()
        return self._run_batch(x)

    @property
    def trunk_kind(self) -> str:
        """What computed the activations: 'native' (prune_ext's trunk, on the batch sizes it was checked on; the
        others ran TensorFlow's kernels) or the engine's own."""
        return "native" if self.path == "checking" and self._proven else self.engine

    @staticmethod
    def _convert_litert(net):
        try:
            import tensorflow as tf
            from ai_edge_litert.interpreter import Interpreter  # noqa: F401
        except ImportError:
            raise BadpruneError("the litert engine needs the ai-edge-litert package",
                                fix="pip install ai-edge-litert, or use --engine tf") from None
        try:
            with quiet_fds():
                return tf.lite.TFLiteConverter.from_keras_model(net).convert()
        except Exception as e:
            raise BadpruneError(f"cannot convert the model to LiteRT ({type(e).__name__})",
                                fix="use --engine tf") from None

    def _new_interpreter(self):
        from ai_edge_litert.interpreter import Interpreter

        with quiet_fds():
            it = Interpreter(model_content=self._blob, num_threads=1)
        return {"it": it, "inp": it.get_input_details()[0]["index"], "out": it.get_output_details()[0]["index"],
                "n": None}

    def _litert_call(self, x):
        slot = self._pool.get()
        try:
            it = slot["it"]
            if slot["n"] != len(x):
                it.resize_tensor_input(slot["inp"], list(x.shape))
                with quiet_fds():
                    it.allocate_tensors()
                slot["n"] = len(x)
            it.set_tensor(slot["inp"], x)
            it.invoke()
            return it.get_tensor(slot["out"]).copy()
        finally:
            self._pool.put(slot)

    def _run_batch(self, x):
        if self.path == "checking":
            return self._checking_call(x)
        if self.path == "tf":
            return self._tf_call(x)
        if self.path == "litert":
            return self._litert_call(x)
        return np.asarray(self.net.predict(x, batch_size=len(x), verbose=0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._run_batch(np.ascontiguousarray(x, dtype=np.float32))

    def run(self, dataset, batch_size, scale, out, start=0, stop=None, on_batch=None):
        """Fill ``out[i - start]`` for images [start, stop) of ``dataset``; reading overlaps computing.

        Batches hold at most :data:`MAX_BATCH` images. A reader thread converts them into a few reused buffers
        (:meth:`badprune.data.Reader.read_into`) while the engine's workers run the previous ones; a buffer goes
        back to the reader once its batch is computed.
        """
        stop = dataset.n if stop is None else min(stop, dataset.n)
        if stop <= start:
            return out
        self.prepare()
        bs = min(int(batch_size), MAX_BATCH, stop - start)
        free: queue.Queue = queue.Queue()
        for _ in range(self.workers + 2):
            free.put(np.empty((bs,) + tuple(dataset.image_shape), np.float32))
        q: queue.Queue = queue.Queue()
        done = object()
        failure = []
        halt = threading.Event()

        def reader():
            try:
                with dataset.reader() as rd:
                    for lo in range(start, stop, bs):
                        buf = None
                        while buf is None and not halt.is_set():
                            try:
                                buf = free.get(timeout=0.05)
                            except queue.Empty:
                                pass
                        if buf is None:
                            break
                        n = min(bs, stop - lo)
                        rd.read_into(buf[:n], lo, scale)
                        q.put((lo, n, buf))
            except BaseException as e:  # handed to the main thread
                failure.append(e)
            finally:
                q.put(done)

        th = threading.Thread(target=reader, daemon=True, name="badprune-reader")
        th.start()

        def compute(item):
            lo, n, buf = item
            y = self(buf[:n])
            out[lo - start: lo - start + n] = y.reshape((n,) + out.shape[1:])
            free.put(buf)
            return n

        try:
            if self.workers == 1:
                while (item := q.get()) is not done:
                    n = compute(item)
                    if on_batch:
                        on_batch(n)
            else:
                with ThreadPoolExecutor(self.workers, thread_name_prefix="badprune-engine") as ex:
                    pending = []
                    while (item := q.get()) is not done:
                        pending.append(ex.submit(compute, item))
                        while len(pending) >= self.workers:
                            n = pending.pop(0).result()
                            if on_batch:
                                on_batch(n)
                    for p in pending:
                        n = p.result()
                        if on_batch:
                            on_batch(n)
        finally:
            halt.set()  # the reader stops at its next batch if we stopped early
            th.join()
        if failure:
            raise failure[0]
        return out


def _check_input(model, dataset):
    shape = tuple(model.inputs[0].shape[1:])
    if tuple(dataset.image_shape) != tuple(shape):
        raise BadpruneError(f"images of shape {tuple(dataset.image_shape)} do not fit the model input {shape}",
                            dataset.path, "use data made for this model")


_RUNNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(layer, engine): _Runner}
_RUNNERS_LOCK = threading.Lock()


def _runner(model, layer, engine, net=None) -> _Runner:
    """A :class:`_Runner` for ``model`` up to ``layer`` (None: the whole model). The TensorFlow engines' trunk
    runners are kept with the model (weakly: a trunk shares the model's layers, not the model), so a model is traced
    once per layer and engine; the others (the whole model, which its runner would keep alive; LiteRT, which
    converts the weights it sees) are built anew."""
    engine = engine or DEFAULT_ENGINE
    build = (lambda: _Runner(net if net is not None else (trunk(model, layer) if layer else model), engine))
    if layer is None or engine not in ENGINES or not engine.startswith("tf"):
        return build()
    with _RUNNERS_LOCK:
        try:
            per = _RUNNERS.setdefault(model, {})
        except TypeError:  # not weakly referenceable
            return build()
        r = per.get((layer, engine))
        if r is None:
            r = per[(layer, engine)] = build()
    return r


# --------------------------------------------------------------------------------------------------------------
# public


def extract(model, layer: str, dataset, scale, cache_dir=None, batch_size: int = DEFAULT_BATCH_SIZE,
            progress: bool = True, desc: str | None = None, engine: str | None = None, return_info: bool = False,
            out: np.ndarray | None = None):
    """Activations of ``layer`` over every image of ``dataset`` (pixels times ``scale``), float32 (N, H, W, C).

    ``scale`` is a name of :data:`badprune.options.SCALES` or a number; ``batch_size`` images per trunk call (at
    most :data:`MAX_BATCH`). With ``cache_dir`` the result is cached on
    disk. With ``return_info`` returns ``(array, {'cached', 'seconds', 'img_per_s', 'engine', 'path'})``.
    ``out``: a C-contiguous float32 array of the result's shape to write into (e.g. a slice of a larger array).
    """
    t0 = time.perf_counter()
    engine = engine or DEFAULT_ENGINE
    if engine not in ENGINES:
        raise BadpruneError(f"unknown engine '{engine}'", fix=f"use one of: {', '.join(ENGINES)}")
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if int(batch_size) < 1:
        raise BadpruneError(f"batch size must be positive, got {batch_size}")
    sv = scale_value(scale)
    net = trunk(model, layer)
    _check_input(model, dataset)
    out_shape = (dataset.n,) + tuple(int(s) for s in net.outputs[0].shape[1:])
    if out is not None and (out.shape != out_shape or out.dtype != np.float32 or not out.flags.c_contiguous):
        raise ValueError(f"extract: out must be C-contiguous float32 {out_shape}, got {out.dtype} {out.shape}")
    npy = marker = key = None
    if cache_dir is not None:
        key = cache.cache_key(model_digest(model), layer, dataset, sv, engine)
        cache_dir = str(cache_dir)
        npy, marker = cache.entry_paths(cache_dir, key)
        hit = cache.read_cached(npy, marker, key, out_shape, out, progress, desc or f"{dataset.name}: {layer}",
                                engine, t0)
        if hit is not None:
            return hit if return_info else hit[0]

    runner = _runner(model, layer, engine, net)
    if out is None:
        from .data import check_memory

        check_memory(int(np.prod(out_shape)) * 4, f"the activations of {dataset.n:,} images at '{layer}'",
                     "use a smaller data set or an earlier, smaller layer")
        out = np.empty(out_shape, np.float32)

    t1 = time.perf_counter()
    with stage_progress(dataset.n, desc or f"{dataset.name}: {layer}", "img", enabled=progress) as bar:
        runner.run(dataset, int(batch_size), sv, out, on_batch=bar.update)
    compute_s = time.perf_counter() - t1
    if npy is not None:
        write = False
        try:
            os.makedirs(cache_dir, mode=0o700, exist_ok=True)
            free = shutil.disk_usage(cache_dir).free
        except OSError as e:
            warn(f"cannot create the cache folder {cache_dir} ({e.strerror or e}); continuing without it")
        else:
            write = free >= out.nbytes + (256 << 20)  # a full disk would fail later writes, not only this one
            if not write:
                warn(f"not enough free disk in {cache_dir} to cache {out.nbytes / 1e9:.1f} GB of activations "
                     f"({free / 1e9:.1f} GB free); continuing without caching them")
        if write:
            cache.write_entry(npy, marker, key, out, {"layer": layer, "data": dataset.identity(), "scale": sv,
                                                  "engine": engine})
    dt = time.perf_counter() - t0
    info = {"cached": False, "seconds": dt, "img_per_s": dataset.n / max(compute_s, 1e-9), "engine": engine,
            "trunk": runner.trunk_kind, "path": npy}
    return (out, info) if return_info else out


def predict(model, dataset, scale, batch_size: int | None = DEFAULT_BATCH_SIZE, start: int = 0,
            stop: int | None = None, engine: str | None = None) -> np.ndarray:
    """The full model's outputs over images [start, stop) of ``dataset`` (float32 (n, classes))."""
    _check_input(model, dataset)
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    stop = dataset.n if stop is None else min(stop, dataset.n)
    runner = _runner(model, None, engine)
    out = np.empty((max(stop - start, 0),) + tuple(int(s) for s in model.outputs[0].shape[1:]), np.float32)
    return runner.run(dataset, int(batch_size), scale_value(scale), out, start, stop)


def detect_scale(model, dataset, n: int = cache.SCALE_SAMPLE, batch_size: int | None = DEFAULT_BATCH_SIZE,
                 engine: str | None = None, cache_dir=None, layer: str | None = None, classify=None):
    """Pick the pixel scale (``data.SCALES``) under which the model classifies the first ``n`` images best.

    Returns ``(scale_name, {scale_name: accuracy})``; ties go to the first scale ('raw'). The images are read
    once and multiplied per scale (the same float32 values :meth:`badprune.data.Dataset.batches` gives). With
    ``cache_dir`` the decision is kept in a small entry keyed like the activations (model, data file, ``n``,
    engine), so a warm run does not run the model at all.

    With ``layer`` and ``classify`` (``layer``'s activations -> labels, e.g. the compiled head's
    :meth:`~badprune.head.Head.labels`), the model runs only up to ``layer``, on the trunk runner the extraction
    then reuses (one TensorFlow trace instead of two), and ``classify`` labels the activations.
    """
    if (layer is None) != (classify is None):
        raise ValueError("detect_scale: give layer and classify together, or neither")
    n = min(int(n), dataset.n)
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    if n < 1:
        raise BadpruneError("no images to detect the pixel scale on", dataset.path)
    labels = np.asarray(dataset.labels[:n])
    _check_input(model, dataset)
    engine = engine or DEFAULT_ENGINE
    path = key = None
    if cache_dir is not None:
        key = cache.scale_key(model_digest(model), dataset, n, engine)
        path = cache.scale_path(cache_dir, key)
        hit = cache.read_scale(path, key)
        if hit is not None:
            return hit
    runner = _runner(model, layer, engine)
    runner.prepare()
    x1 = dataset.read(1.0, 0, n)
    end = model.get_layer(layer).output if layer else model.outputs[0]
    out = np.empty((n,) + tuple(int(s) for s in end.shape[1:]), np.float32)
    bs = max(1, min(int(batch_size), MAX_BATCH, n))
    accs = {}
    with ThreadPoolExecutor(runner.workers, thread_name_prefix="badprune-engine") as ex:
        for name, value in SCALES.items():
            batches = [x1[lo:lo + bs] for lo in range(0, n, bs)]
            if float(value) != 1.0:
                with np.errstate(over="ignore", invalid="ignore"):
                    batches = [x * np.float32(value) for x in batches]
            for lo, y in zip(range(0, n, bs), ex.map(runner, batches)):
                out[lo:lo + len(y)] = y.reshape((len(y),) + out.shape[1:])
            pred = np.asarray(classify(out)) if layer else out.reshape(n, -1).argmax(axis=1)
            accs[name] = float((pred == labels).mean())
    best = cache.best_scale(accs)
    if path is not None:
        try:  # a cache that cannot be written is reported once, by the extraction that follows
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            cache.write_json(path, {"key": key, "scale": best, "accuracy": accs, "n": n,
                                    "version": cache.FORMAT_VERSION})
        except OSError:
            pass
    return best, accs
