"""Training: the loop (trainer.py), its checkpoints (checkpoints.py), how it spreads over processes (distributed.py)
and its data (data.py)."""

from .data import FolderDataset, ShapesDataset
from .trainer import TrainConfig, Trainer

__all__ = ["FolderDataset", "ShapesDataset", "TrainConfig", "Trainer"]
