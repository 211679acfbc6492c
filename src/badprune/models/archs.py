"""Built-in architectures that ``--arch`` builds (weights are then loaded by layer name)."""
from __future__ import annotations

from .. import _tf  # noqa: F401  (quiet TensorFlow before keras is imported)

import keras

def build_deepid(num_classes: int = 1283, input_shape=(55, 47, 3)) -> keras.Model:
    """The NYU CSAW-HackML lab's DeepID network, with the lab's layer names (so Keras-2 weight files load by name)."""
    L = keras.layers
    x = keras.Input(shape=input_shape, name="input")
    h = L.Conv2D(20, (4, 4), activation="relu", name="conv_1")(x)
    h = L.MaxPooling2D((2, 2), name="pool_1")(h)
    h = L.Conv2D(40, (3, 3), activation="relu", name="conv_2")(h)
    h = L.MaxPooling2D((2, 2), name="pool_2")(h)
    h = L.Conv2D(60, (3, 3), activation="relu", name="conv_3")(h)
    p3 = L.MaxPooling2D((2, 2), name="pool_3")(h)
    f1 = L.Flatten(name="flatten_1")(p3)
    fc1 = L.Dense(160, name="fc_1")(f1)
    c4 = L.Conv2D(80, (2, 2), activation="relu", name="conv_4")(p3)
    f2 = L.Flatten(name="flatten_2")(c4)
    fc2 = L.Dense(160, name="fc_2")(f2)
    add = L.Add(name="add_1")([fc1, fc2])
    act = L.Activation("relu", name="activation_1")(add)
    y = L.Dense(num_classes, activation="softmax", name="output")(act)
    return keras.Model(inputs=x, outputs=y, name="deepid")



#: architectures that ``--arch`` can build, by name
BUILDERS = {"deepid": build_deepid}
ARCHS = tuple(BUILDERS)
