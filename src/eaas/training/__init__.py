"""Training a small MoE on text that ships with Python (``eaas checkpoint train``).

``corpus`` finds and splits the text, ``trainer`` trains and writes the
checkpoint, ``routing`` measures expert load (pure statistics plus the pass
that collects them), ``report`` writes the JSON and PNG next to the checkpoint.
"""

from eaas.training.corpus import Corpus, load_corpus
from eaas.training.routing import ExpertLoad, gini, hottest_fraction, layer_load
from eaas.training.trainer import TrainConfig, TrainResult, train

__all__ = [
    "Corpus",
    "ExpertLoad",
    "TrainConfig",
    "TrainResult",
    "gini",
    "hottest_fraction",
    "layer_load",
    "load_corpus",
    "train",
]
