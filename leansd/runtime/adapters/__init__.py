"""Adapters people bring to a model: LoRA files and textual-inversion embeddings, applied at run time by
patching the weights the backend runs (see `state`). Nothing here imports torch."""
from leansd.runtime.adapters.embeddings import Embedding, read_embedding
from leansd.runtime.adapters.lora import LoraFile, LowRank, read_lora
from leansd.runtime.adapters.state import Adapters, AppliedLora
from leansd.runtime.adapters.tags import LoraRequest, extract
from leansd.runtime.adapters.weight_map import MAP_FILE, GraphWeights, WeightMap

__all__ = ["Adapters", "AppliedLora", "Embedding", "GraphWeights", "LoraFile", "LoraRequest", "LowRank", "MAP_FILE", "WeightMap",
           "extract", "read_embedding", "read_lora"]
