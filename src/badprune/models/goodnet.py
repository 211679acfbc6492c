"""The GoodNet graph G(B, B'): B's trunk once, B's head, and B's head after a 0/1 channel mask, scores whose argmax
is B's label where both heads agree, else N (:mod:`badprune.goodnet` says more; this module only builds it, so
that the cache's record of B, :mod:`badprune.record`, can keep its template without importing the layers above)."""
from __future__ import annotations

from ..errors import BadpruneError
from .kinds import GOODNET_OUTPUT


def import_keras():
    """Keras (and TensorFlow), imported on first use, with a clear error when TensorFlow is missing."""
    try:
        from .. import _tf  # noqa: F401  (quiet TensorFlow before keras is imported)
        import keras
    except ImportError as e:
        raise BadpruneError(f"Keras models need TensorFlow, which is not installed ({e})",
                            fix="export the model to .tflite (badprune-fast export) and run that, or install "
                                "tensorflow") from None
    return keras


def _ends_in_softmax(model) -> bool:
    hist = getattr(model.outputs[0], "_keras_history", None)
    if hist is None:
        return False
    op = hist[0]
    if type(op).__name__ == "Softmax":
        return True
    act = getattr(op, "activation", None)
    return getattr(act, "__name__", None) == "softmax"


def _argmax(t):
    """argmax over the last axis as top_k(k=1) (the lowest index wins ties, like numpy). ``keras.ops.argmax`` on
    floats adds a negative-zero fix (a bitwise AND) that LiteRT has no builtin kernel for."""
    ops = import_keras().ops
    _, idx = ops.top_k(t, k=1)
    return ops.squeeze(idx, axis=-1)


def build_goodnet(model, layer: str, channels, name: str | None = None, repaired=None,
                  shared_trunk: bool = True):
    """G(B, B') as one graph: B's trunk once, B's head and B's head after a 0/1 channel mask.

    With ``repaired`` (a network R_X derived from B with ``channels`` pruned), the second head is R_X's instead:
    R_X's head after the mask when ``shared_trunk`` (its trunk is B's, as after head fine-tuning), else all of
    R_X run on the input next to B.

    Parameters
    ----------
    model : keras.Model
        B (not modified).
    layer : str
        The prune layer.
    channels : sequence of int
        The channels of ``layer`` pruned in B'.
    name : str, optional
        The model's name.

    Returns
    -------
    keras.Model
        One output, ``goodnet_scores`` (n, N + 1), whose argmax is the label (see the module docstring).
    """
    return _build(model, layer, channels, name, repaired, shared_trunk)[0]


def _build(model, layer, channels, name, repaired, shared_trunk) -> tuple:
    """(:func:`build_goodnet`'s model, the name of its mask layer)."""
    if len(model.inputs) != 1:
        raise BadpruneError(f"the model has {len(model.inputs)} inputs", fix="use a model with one image input")
    keras = import_keras()
    from . import prune_output, surgery, trace
    from . import num_classes as _num_classes

    _num_classes(model)  # a classifier with one (batch, classes) output
    Bc = surgery.clone(model)
    start = prune_output(Bc, layer)
    C = int(start.shape[-1])
    chans = surgery.check_channels(channels, C, layer)
    existing = {l.name for l in Bc.layers}
    mask_layer = surgery.mask_layer(surgery.unique_name(existing, f"{layer}_prune_mask"))
    masked = mask_layer(start)
    surgery.set_mask(mask_layer, surgery.channel_mask(C, chans))

    ops = keras.ops
    p_b = Bc.outputs[0]
    if repaired is None:
        p_p = surgery.replay(trace(p_b, start, layer), start, masked)[id(p_b)]
    else:
        def rename(n):
            return surgery.unique_name(existing, f"repaired_{n}")

        r_out = repaired.outputs[0]
        if shared_trunk:
            r_start = prune_output(repaired, layer)
            p_p = surgery.replay(trace(r_out, r_start, layer), r_start, masked, rename)[id(r_out)]
        else:
            r_in = repaired.inputs[0]
            p_p = surgery.replay(trace(r_out, r_in, layer), r_in, Bc.inputs[0], rename)[id(r_out)]
    agree = ops.equal(_argmax(p_b), _argmax(p_p))
    probs = p_b if _ends_in_softmax(Bc) else \
        keras.layers.Softmax(name=surgery.unique_name(existing, "goodnet_softmax"))(p_b)
    a = ops.cast(ops.expand_dims(agree, -1), probs.dtype)
    scores = keras.layers.Concatenate(axis=-1, name=surgery.unique_name(existing, GOODNET_OUTPUT))(
        [ops.multiply(probs, a), ops.subtract(1.0, a)])
    return keras.Model(Bc.inputs, scores, name=name or "goodnet"), mask_layer.name


def sweep_template(model, layer: str, name: str | None = None) -> tuple:
    """One G graph of ``model`` (B) pruning ``layer`` from which every G_X differs only in its 0/1 mask (and
    name): ``(template, Patch)`` (:class:`badprune.models.channels.Patch`, rule 'mask'), for
    :func:`badprune.models.save_variants` / :func:`badprune.models.saving.write_variants`."""
    from .channels import Patch

    template, mask_name = _build(model, layer, [], name, None, True)
    n = int(template.get_layer(mask_name).get_weights()[0].shape[2])
    return template, Patch(mask_name, "mask", n)
