"""Model surgery: copies of a model with channels of the prune layer pruned (B'_X) or the weights that prune them
(:func:`prune_variants`), the 0/1 channel-mask layer, fresh clones, and replaying a model's layers from a new
tensor (one graph, shared weights).
"""
from __future__ import annotations

from .. import _tf  # noqa: F401  (quiet TensorFlow before keras is imported)

import keras
import numpy as np

from .channels import Patch, channel_mask, check_channels, mask_weights, zeroed
from .graph import conv_producer

__all__ = ["Patch", "channel_mask", "check_channels", "clone", "insert_after", "mask_layer", "mask_weights",
           "prune_model", "prune_template", "prune_variants", "replay", "set_mask", "unique_name"]


def clone(model):
    """A copy with fresh layers and the same weights (building on it must not add nodes to ``model``'s layers)."""
    new = keras.models.clone_model(model)
    new.set_weights(model.get_weights())
    return new


def prune_model(model, layer: str, channels) -> keras.Model:
    """A copy of ``model`` with ``channels`` of ``layer`` pruned (the original is not touched).

    Zeroes the producing convolution's kernel[..., c] and bias[c] when there is one (:func:`conv_producer`);
    otherwise inserts after ``layer`` a 1x1 DepthwiseConv2D named '<layer>_prune_mask' whose weights are the 0/1
    channel mask. Either way the result is a plain Keras model with the original layer names.
    """
    n = int(model.get_layer(layer).output.shape[-1])
    chans = check_channels(channels, n, layer)
    conv = conv_producer(model, layer)
    if conv is not None:
        new = clone(model)
        cl = new.get_layer(conv)
        cl.set_weights(zeroed(cl.get_weights(), chans))
        return new

    mask = channel_mask(n, chans)
    mname = _mask_name(model, layer)

    def make_mask():
        return mask_layer(mname)

    if isinstance(model, keras.Sequential):
        new_layers = []
        mask_l = None
        for l in model.layers:
            new_layers.append(l.__class__.from_config(l.get_config()))
            if l.name == layer:
                mask_l = make_mask()
                new_layers.append(mask_l)
        hist = getattr(model.inputs[0], "_keras_history", None)
        inp = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype,
                          name=hist[0].name if hist else None)
        new = keras.Sequential([inp] + new_layers, name=model.name)
    else:
        holder = {}

        def add_mask(t):
            holder["mask"] = make_mask()
            return holder["mask"](t)

        new = insert_after(model, layer, add_mask, copy_weights=False)
        mask_l = holder["mask"]
    for l in model.layers:
        if l.weights:
            new.get_layer(l.name).set_weights(l.get_weights())
    set_mask(mask_l, mask)
    return new


def _mask_name(model, layer: str) -> str:
    return unique_name({l.name for l in model.layers}, f"{layer}_prune_mask")


def prune_template(model, layer: str) -> tuple:
    """One model from which :func:`prune_model`'s B' for any set of ``layer``'s channels differs only in one
    layer's weights: ``(template, Patch)`` (:class:`~badprune.models.channels.Patch` gives those weights).

    With a producing convolution the template is ``model`` itself (a fresh clone if ``model`` is compiled, so no
    training state is saved) and the patch zeroes the convolution's channels; otherwise it is ``model`` with the
    mask inserted (all ones) and the patch is the mask's kernel.
    """
    n = int(model.get_layer(layer).output.shape[-1])
    conv = conv_producer(model, layer)
    if conv is not None:
        template = clone(model) if getattr(model, "compiled", False) else model
        return template, Patch(conv, "zero", n, [np.asarray(w) for w in template.get_layer(conv).get_weights()])
    return prune_model(model, layer, []), Patch(_mask_name(model, layer), "mask", n)


def prune_variants(model, layer: str, channel_sets) -> tuple:
    """One model and, per set of ``layer``'s channels, the weights that make it :func:`prune_model`'s B' for that
    set: ``(template, [{layer name: [arrays]}])`` (:func:`prune_template`), for
    :func:`badprune.models.saving.save_variants`."""
    n = int(model.get_layer(layer).output.shape[-1])
    sets = [check_channels(c, n, layer) for c in channel_sets]
    template, patch = prune_template(model, layer)
    return template, [patch.weights(chans) for chans in sets]


def insert_after(model, layer: str, fn, copy_weights: bool = True):
    """A copy of ``model`` with ``fn(tensor)`` (new layers or ``keras.ops`` calls) applied to ``layer``'s output;
    the other layers keep their names and (with ``copy_weights``) their weights. A Sequential model comes back as
    a functional one."""
    if isinstance(model, keras.Sequential):
        hist = getattr(model.inputs[0], "_keras_history", None)
        inp = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype,
                          name=hist[0].name if hist else None)
        x = inp
        for lay in model.layers:
            x = lay.__class__.from_config(lay.get_config())(x)
            if lay.name == layer:
                x = fn(x)
        new = keras.Model(inp, x, name=model.name)
    else:
        def call_function(lay, *args, **kwargs):
            out = lay(*args, **kwargs)
            return fn(out) if lay.name == layer else out

        new = keras.models.clone_model(model, call_function=call_function)
    if copy_weights:
        for lay in model.layers:
            if lay.weights:
                new.get_layer(lay.name).set_weights(lay.get_weights())
    return new


def unique_name(existing: set, name: str) -> str:
    """``name``, or ``name_2``, ``name_3``, ... : the first not in ``existing`` (which it is added to)."""
    new, k = name, 1
    while new in existing:
        k += 1
        new = f"{name}_{k}"
    existing.add(new)
    return new


def mask_layer(name: str):
    """The channel mask: a 1x1 DepthwiseConv2D without bias (its weights, set by :func:`set_mask`, are 0/1)."""
    return keras.layers.DepthwiseConv2D(1, use_bias=False, name=name)


def set_mask(layer, mask) -> None:
    """Set a :func:`mask_layer`'s weights to the 0/1 vector ``mask``."""
    mask = np.asarray(mask, np.float32)
    layer.set_weights([mask.reshape(1, 1, len(mask), 1)])


def replay(nodes, start_tensor, new_start, rename=None):
    """Call again the traced layer calls ``nodes`` (:func:`badprune.models.graph.trace`) from ``new_start`` in place
    of ``start_tensor``; returns {id(old tensor): new tensor}.

    By default the same layer objects are called (shared weights). With ``rename`` (a function from a layer name
    to a new, unused one) each layer is called as a fresh copy of that name holding the same weights, so the
    result can sit in one graph next to the original layers (``keras.ops`` nodes are called as they are).
    """
    memo = {id(start_tensor): new_start}
    copies = {}
    for tn in nodes:
        layer = tn.layer
        if rename is not None and isinstance(layer, keras.layers.Layer):  # keras.ops nodes are stateless
            if id(layer) not in copies:
                cfg = dict(layer.get_config(), name=rename(layer.name))
                copies[id(layer)] = (layer.__class__.from_config(cfg), layer)
            layer = copies[id(layer)][0]
        args, kwargs = tn.node.arguments.fill_in(memo)
        outs = keras.tree.flatten(layer(*args, **kwargs))
        for old, new in zip(tn.node.output_tensors, outs):
            memo[id(old)] = new
    for copy, original in copies.values():
        copy.set_weights(original.get_weights())
    return memo
