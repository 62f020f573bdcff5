"""LightningDataModule with a global batch size and exact mid-epoch resumption."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sized
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from repae.datamodules.datasets import CorruptSampleError

log = logging.getLogger(__name__)
ON_CORRUPT = ("error", "skip")
# Key of the message a replaced sample carries through the DataLoader (SkipCorrupt); "" when none.
REPLACED = "replaced"


class ResumableDistributedSampler(Sampler[int]):
    """``DistributedSampler`` whose epoch can be resumed part-way through.

    Each epoch is a permutation drawn from a ``torch.Generator`` seeded with ``seed + epoch``
    (identical on every rank), cut to a multiple of ``num_replicas`` (``drop_last``) or padded by
    wrapping around, and dealt to the ranks round-robin, so the ranks partition the epoch. The
    first ``start_batch`` per-device batches of the epoch are skipped; ``set_epoch`` to a new
    epoch resets that offset to 0.

    ``len()`` is the full per-rank epoch length even when ``start_batch > 0``: after a restart
    Lightning restores its batch counter to ``start_batch`` and ends the epoch when the counter
    reaches ``len(dataloader)``.

    The sampler also owns the generator that the DataLoader draws its workers' base seed from.
    ``set_epoch`` reseeds it from (seed, epoch, rank), so every worker's ``torch``, ``random`` and
    ``numpy`` RNGs (seeded by PyTorch from base seed + worker id) depend only on (seed, epoch,
    rank, worker), also after a resume.

    Args:
        dataset: anything with ``len()``.
        batch_size: per-device batch size (the unit of ``start_batch``).
        num_replicas: number of ranks.
        rank: this rank.
        seed: shuffle seed, shared by all ranks.
        shuffle: ``False`` keeps the dataset order (still split across ranks).
        drop_last: drop the tail that does not divide evenly across ranks (else pad by wrapping).
        epoch: epoch to start in.
        start_batch: per-device batches of ``epoch`` already consumed.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        epoch: int = 0,
        start_batch: int = 0,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.dataset_size = len(dataset)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        if drop_last:
            self.num_samples = self.dataset_size // num_replicas
        else:
            self.num_samples = math.ceil(self.dataset_size / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.worker_seed_generator = torch.Generator()
        self.epoch = epoch
        self.start_batch = start_batch
        self._seed_workers()

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch; a new epoch starts from its first batch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.start_batch = 0
        self._seed_workers()

    def _seed_workers(self) -> None:
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(2, dtype=np.uint32)
        self.worker_seed_generator.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)

    def epoch_indices(self) -> list[int]:
        """This rank's indices for the whole current epoch (ignoring ``start_batch``)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            indices = list(range(self.dataset_size))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            padding = self.total_size - len(indices)
            indices += (indices * math.ceil(padding / max(len(indices), 1)))[:padding]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return self.num_samples


class SkipCorrupt(Dataset):
    """``dataset`` with each unreadable sample replaced by the next readable one (wrapping around).

    The replacement depends only on the index, so every run, and a resumed one, sees the same
    batches. Each sample gets a ``"replaced"`` entry: ``""``, or the error that named the
    unreadable file (the default collate gathers these strings into a list per batch, so the
    main process learns of samples skipped inside DataLoader workers).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        replaced = ""
        for offset in range(len(self.dataset)):
            try:
                return {**self.dataset[(index + offset) % len(self.dataset)], REPLACED: replaced}
            except CorruptSampleError as error:
                replaced = replaced or str(error)
        raise CorruptSampleError(f"none of the {len(self.dataset)} samples can be read, e.g. {replaced}")


class ImageDataModule(L.LightningDataModule):
    """Training data for any dataset returning ``{"image", "label"[, "latent"]}`` dicts.

    ``batch_size`` is the GLOBAL batch size (the official ``--batch-size``): each device gets
    ``batch_size // world_size``. Shuffling and the split across ranks are done by
    ``ResumableDistributedSampler``, so the Trainer must be built with
    ``use_distributed_sampler=False`` (otherwise Lightning replaces the sampler with its own
    ``DistributedSampler``, which cannot resume mid-epoch).

    The module counts the training batches consumed in the current epoch and stores
    ``{"epoch", "batches_consumed"}`` in Lightning checkpoints (``state_dict``). After a restore,
    ``train_dataloader`` skips exactly the batches already consumed, so a resumed run sees the same
    batches as an uninterrupted one. Lightning will still warn that the dataloader "is not
    resumable" (it only knows about stateful dataloaders); the warning does not apply here.
    Counting relies on this class's ``on_after_batch_transfer``: a LightningModule that also
    overrides that hook is ignored by Lightning in favour of the datamodule's.

    An unreadable sample stops the run (``on_corrupt="error"``) or is replaced (``"skip"``, see
    ``SkipCorrupt``); ``skipped`` lists the replaced ones, each logged once when first met, and is
    saved in checkpoints so that the report at the end of a resumed run is complete.

    Args:
        dataset: a map-style dataset returning the sample dict.
        batch_size: global batch size, divisible by the number of devices.
        num_workers: DataLoader worker processes per device.
        pin_memory: pin host memory (only applied when CUDA is available).
        seed: shuffle and worker seed.
        drop_last: drop the last incomplete batch (and the samples that do not divide across ranks).
        persistent_workers: keep workers alive between epochs; ``None`` = ``num_workers > 0``.
            Persistent workers keep the RNG seeds of the epoch they were started in.
        on_corrupt: ``"error"`` or ``"skip"`` (``data.on_corrupt``).
        held_out: a held-out split of the same data (never trained on) for callbacks that measure the
            model, e.g. ``VAEHealthCallback`` (``data.held_out``); None: the data has none configured.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_workers: int = 4,
        pin_memory: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        persistent_workers: bool | None = None,
        on_corrupt: str = "error",
        held_out: Dataset | None = None,
    ):
        super().__init__()
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"data.on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")
        self.dataset = dataset
        self.held_out = held_out
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.drop_last = drop_last
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.batch_size_per_device: int | None = None
        self.on_corrupt = on_corrupt
        self.skipped: list[str] = []
        self.epoch = 0
        self.batches_consumed = 0

    def _world(self) -> tuple[int, int]:
        """(rank, world size) from the trainer, (0, 1) without one."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def setup(self, stage: str | None = None) -> None:
        _, world_size = self._world()
        if self.batch_size % world_size != 0:
            raise ValueError(
                f"data.batch_size={self.batch_size} is the global batch size and must be divisible by "
                f"the number of devices ({world_size})"
            )
        self.batch_size_per_device = self.batch_size // world_size
        per_rank = (
            len(self.dataset) // world_size if self.drop_last else math.ceil(len(self.dataset) / world_size)
        )
        if per_rank < (self.batch_size_per_device if self.drop_last else 1):
            raise ValueError(
                f"the dataset has {len(self.dataset)} samples, fewer than one batch (data.batch_size="
                f"{self.batch_size} over {world_size} devices): a run would train nothing"
            )

    def train_dataloader(self) -> DataLoader:
        if self.batch_size_per_device is None:
            raise RuntimeError("ImageDataModule.setup() must be called before train_dataloader()")
        rank, world_size = self._world()
        sampler = ResumableDistributedSampler(
            self.dataset,
            batch_size=self.batch_size_per_device,
            num_replicas=world_size,
            rank=rank,
            seed=self.seed,
            drop_last=self.drop_last,
            epoch=self.epoch,
            start_batch=self.batches_consumed,
        )
        return DataLoader(
            SkipCorrupt(self.dataset) if self.on_corrupt == "skip" else self.dataset,
            batch_size=self.batch_size_per_device,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=self.drop_last,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            generator=sampler.worker_seed_generator,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and REPLACED in batch:
            for message in batch.pop(REPLACED):
                if message and message not in self.skipped:
                    log.warning("data.on_corrupt=skip: replaced a sample: %s", message)
                    self.skipped.append(message)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called once per batch right before training_step, so it counts consumed batches (batches
        # prefetched by workers or the data fetcher are not counted).
        if self.trainer is not None and self.trainer.training:
            if self.trainer.current_epoch != self.epoch:
                self.epoch = self.trainer.current_epoch
                self.batches_consumed = 0
            self.batches_consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "batches_consumed": self.batches_consumed}
        if self.skipped:  # only then, so checkpoints of clean data keep their two entries
            state["skipped"] = list(self.skipped)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = state_dict["epoch"]
        self.batches_consumed = state_dict["batches_consumed"]
        self.skipped = list(state_dict.get("skipped", []))
