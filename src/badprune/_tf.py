"""Import-time TensorFlow settings: silence its log noise and turn on oneDNN (2-2.5x faster on CPU here).

Imported (for its side effects) by every badprune module that imports TensorFlow or Keras, before they do.
TensorFlow 2.21 prints a few lines straight to file descriptor 2 while it loads (before absl logging is set up, so
TF_CPP_MIN_LOG_LEVEL does not reach them); the import runs with fd 2 pointed at a temporary file, which is shown
only if the import fails. The garbage collector is paused for the import: TensorFlow creates ~350k objects that all
stay alive, and the full collections that would otherwise run over them (and find nothing) cost ~1.5 s of the ~5 s.
"""
import contextlib
import gc
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@contextlib.contextmanager
def _gc_paused():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _quiet_import():
    if "tensorflow" in sys.modules:
        return
    with _gc_paused():
        _import()


def _import():
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all
        import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except Exception:  # pragma: no cover
        pass
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")


_quiet_import()


def seed_all(seed) -> None:
    """Seed Keras/TensorFlow/numpy's global generators and make TensorFlow's ops deterministic (the one seeding of
    every training: the repair's, :mod:`badprune._train`, and the demo BadNet's)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # pragma: no cover  (older TensorFlow)
        pass
