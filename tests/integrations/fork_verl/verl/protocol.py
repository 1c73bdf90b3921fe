"""A small DataProto: ``batch`` (tensors, one row per step), ``non_tensor_batch`` (numpy object
arrays), ``meta_info``; the row operations the fork's trainer uses."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class DataProto:
    def __init__(self, batch: dict[str, torch.Tensor], non_tensor_batch: dict[str, np.ndarray],
                 meta_info: dict[str, Any] | None = None) -> None:
        self.batch = batch
        self.non_tensor_batch = non_tensor_batch
        self.meta_info = meta_info or {}

    @classmethod
    def from_single_dict(cls, data: dict[str, Any]) -> DataProto:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in data.items() if not isinstance(v, torch.Tensor)}
        return cls(tensors, others)

    def __len__(self) -> int:
        return len(next(iter(self.non_tensor_batch.values())))

    def select_idxs(self, idxs: np.ndarray) -> DataProto:
        index = torch.as_tensor(idxs)
        return DataProto({k: v[index] for k, v in self.batch.items()},
                         {k: v[idxs] for k, v in self.non_tensor_batch.items()}, self.meta_info)

    def reorder(self, idxs: torch.Tensor) -> None:
        self.batch = {k: v[idxs] for k, v in self.batch.items()}
        order = idxs.numpy()
        self.non_tensor_batch = {k: v[order] for k, v in self.non_tensor_batch.items()}

    @staticmethod
    def concat(data: list[DataProto]) -> DataProto:
        first = data[0]
        return DataProto({k: torch.cat([d.batch[k] for d in data]) for k in first.batch},
                         {k: np.concatenate([d.non_tensor_batch[k] for d in data])
                          for k in first.non_tensor_batch}, first.meta_info)
