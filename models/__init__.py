"""The EmbeddingBag module, input validation and checkpoint I/O. Never imports FastAPI."""

from models.checkpoints import (
    CheckpointError,
    UnsafeCheckpointError,
    list_tensors,
    read_checkpoint,
    write_npy,
    write_safetensors,
)
from models.embedding_bag import EmbeddingBag
from models.inputs import FlatBatch, InvalidInputError, flatten_inputs
from models.tables import load_table

__all__ = [
    "CheckpointError",
    "EmbeddingBag",
    "FlatBatch",
    "InvalidInputError",
    "UnsafeCheckpointError",
    "flatten_inputs",
    "list_tensors",
    "load_table",
    "read_checkpoint",
    "write_npy",
    "write_safetensors",
]
