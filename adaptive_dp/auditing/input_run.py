"""Black-box input canaries: mislabelled training examples, scored by their loss under the final model.

:meth:`InputCanaryRun.insert` picks m training examples (seeded), gives each a wrong label
(:func:`~adaptive_dp.auditing.canaries.mislabel`) and flips a fair coin per canary
(:func:`~adaptive_dp.auditing.canaries.draw_inclusion`). As in Algorithm 1 of Steinke, Nasr & Jagielski
(arXiv:2305.08846v1), the m canaries are auditing examples separate from the always-included training data:
the m chosen examples are **removed** from the training set, and only the mislabelled copies of the included
canaries are put back. The training set is then ``ConcatDataset([the other N - m examples, the included
canaries])``; an excluded canary is in no form in the run. (Keeping the correct-label originals would pull
every canary's loss toward its true label whether it was included or not, and cost the audit power.)

After training, :meth:`InputCanaryRun.audit` scores each canary by its negative loss under its wrong label
(:func:`~adaptive_dp.auditing.canaries.input_canary_scores`) and turns the scores into ε̂
(:func:`~adaptive_dp.auditing.audit_from_scores`, ``mode="input"``). The auditor needs only the final model.

The loader is rebuilt over the new training set like the audit carve's
(:func:`~adaptive_dp.leakage.audit.rebuild_loader`: same batch size and worker settings), so opacus' sample
rate q = 1 / len(loader) is computed on what is really trained on. Insert the canaries *after* carving the
audit split (so no canary is an audit example) and *before* opacus' ``make_private`` builds the Poisson loader.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from adaptive_dp.auditing.audit import CanaryAudit, audit_from_scores
from adaptive_dp.auditing.canaries import (
    canary_seeds,
    draw_inclusion,
    input_canary_scores,
    make_input_canaries,
    mislabel,
)
from adaptive_dp.leakage.audit import rebuild_loader

__all__ = ["InputCanaryRun"]

_STATE_KEYS = ("count", "seed", "num_classes", "indices", "shifts", "included")


def _infer_num_classes(dataset: Dataset) -> int:
    root: Any = dataset
    while isinstance(root, Subset):
        root = root.dataset
    info = getattr(root, "info", None)
    if info is not None and hasattr(info, "num_classes"):
        return int(info.num_classes)
    classes = getattr(root, "classes", None)
    if classes is not None:
        return len(classes)
    raise ValueError(
        f"cannot tell the number of classes of a {type(root).__name__}; pass num_classes= to InputCanaryRun.insert"
    )


class _MislabelledExamples(Dataset):
    """Examples ``indices`` of ``dataset`` with the labels ``labels`` (same label type as the dataset's)."""

    def __init__(self, dataset: Dataset, indices: list[int], labels: list[int]) -> None:
        self.dataset, self.indices, self.labels = dataset, indices, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.dataset[self.indices[i]]
        label = self.labels[i]
        return x, torch.tensor(label, dtype=y.dtype) if isinstance(y, Tensor) else label


class InputCanaryRun:
    """Black-box input canaries: mislabelled training examples, scored by loss at the end.

    Build it with :meth:`insert`, which also returns the training loader with the canaries in.

    Args:
        dataset: the training dataset (map-style, items ``(x, y)`` with an integer class label y).
        count: m, the number of canaries; 2 <= m <= len(dataset).
        num_classes: K; None: read from the dataset (``info.num_classes`` of this package's data sets, or
            ``len(classes)`` of torchvision's).
        seed: seed of the choice of examples and labels, and of the coin flips (independent streams).

    Attributes:
        indices: [m] int64 positions of the canary examples in ``dataset``.
        labels: [m] int64 wrong labels of the canaries.
        included: [m] bool coin flips (True: the mislabelled copy is trained on).

    Raises:
        ValueError: m out of range, K < 2 or not known, a label outside [0, K), or a bad seed.
    """

    def __init__(self, *, dataset: Dataset, count: int, num_classes: int | None, seed: int) -> None:
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 2:
            raise ValueError(f"count must be an int >= 2 (the audit guesses on two sides), got {count!r}.")
        self.dataset = dataset
        self.count, self.seed = int(count), seed
        self.num_classes = _infer_num_classes(dataset) if num_classes is None else num_classes
        choice_seed, inclusion_seed = canary_seeds(seed=seed, streams=2)
        self.indices, self.shifts = make_input_canaries(
            dataset_size=len(dataset), count=self.count, num_classes=self.num_classes, seed=choice_seed
        )
        targets = torch.tensor([int(dataset[int(i)][1]) for i in self.indices])
        self.labels = mislabel(targets=targets, shifts=self.shifts, num_classes=self.num_classes)
        self.included = draw_inclusion(count=self.count, seed=inclusion_seed)

    @classmethod
    def insert(
        cls, data_loader: DataLoader, *, count: int, num_classes: int | None, seed: int
    ) -> tuple[DataLoader, InputCanaryRun]:
        """Put canaries into a training loader's data set.

        Returns:
            ``(loader, run)``: a DataLoader (batch size and worker settings of ``data_loader``) over the
            N - m examples that are not canaries plus the mislabelled copies of the included canaries, and the
            run to audit after training.

        Raises:
            ValueError: as the constructor, or ``data_loader`` has no ``batch_size`` (see ``rebuild_loader``).
        """
        run = cls(dataset=data_loader.dataset, count=count, num_classes=num_classes, seed=seed)
        return rebuild_loader(data_loader, run.training_dataset()), run

    def training_dataset(self) -> Dataset:
        """The training set with the canaries in: the N - m other examples, then the included canaries."""
        chosen = set(self.indices.tolist())
        others = Subset(self.dataset, [i for i in range(len(self.dataset)) if i not in chosen])
        kept = self.included.nonzero().flatten().tolist()
        canaries = _MislabelledExamples(
            self.dataset, [int(self.indices[i]) for i in kept], [int(self.labels[i]) for i in kept]
        )
        return ConcatDataset([others, canaries])

    # ------------------------------------------------------------------ the audit
    def losses(
        self,
        *,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        batch_size: int = 256,
    ) -> Tensor:
        """[m] float64 loss of every canary under its wrong label in ``model`` (evaluation mode, no grad).

        Args:
            model: the final model (plain or opacus-wrapped); its training flag is restored afterwards.
            loss_fn: ``loss_fn(logits [B, K], labels [B]) -> [B]`` per-example losses; default cross-entropy
                (nats) with ``reduction="none"``.
            batch_size: canaries per forward pass.

        Raises:
            ValueError: ``loss_fn`` does not return one loss per canary.
        """
        loss_fn = loss_fn or nn.CrossEntropyLoss(reduction="none")
        device = next(model.parameters()).device
        was_training, out = model.training, []
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, self.count, batch_size):
                    rows = range(start, min(start + batch_size, self.count))
                    x = torch.stack([torch.as_tensor(self.dataset[int(self.indices[i])][0]) for i in rows])
                    labels = self.labels[start : start + len(rows)].to(device)
                    loss = loss_fn(model(x.to(device)), labels)
                    if loss.shape != (len(rows),):
                        raise ValueError("loss_fn must return one loss per example (use reduction='none').")
                    out.append(loss.detach().double().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    def audit(
        self,
        *,
        model: nn.Module,
        delta: float,
        confidence: float = 0.95,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> CanaryAudit:
        """ε̂ at δ from the final model: scores = −loss of each mislabelled canary (``mode="input"``).

        Raises:
            ValueError: as :meth:`losses`, or ``delta`` / ``confidence`` out of range.
        """
        scores = input_canary_scores(losses=self.losses(model=model, loss_fn=loss_fn))
        return audit_from_scores(
            scores=scores, included=self.included, delta=delta, confidence=confidence, mode="input"
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Settings, canary choice and coin flips (the dataset itself is not saved)."""
        return {
            "count": self.count,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "indices": self.indices.clone(),
            "shifts": self.shifts.clone(),
            "included": self.included.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check a :meth:`state_dict` against this run (rebuilt by :meth:`insert` with the saved settings).

        Everything in the state follows from the seed and the dataset, so loading restores nothing new: it
        refuses to continue an audit on other canaries.

        Raises:
            ValueError: a key is missing, or the state's settings, canaries or coin flips differ from this run's.
        """
        missing = set(_STATE_KEYS) - set(state)
        if missing:
            raise ValueError(f"input canary state is missing {sorted(missing)}.")
        mine = self.state_dict()
        for key in _STATE_KEYS:
            same = (
                torch.equal(state[key].cpu(), mine[key])
                if isinstance(mine[key], Tensor)
                else state[key] == mine[key]
            )
            if not same:
                raise ValueError(
                    f"input canary state differs in {key!r}; rebuild the run with InputCanaryRun.insert on the same "
                    "training data with the saved count, num_classes and seed."
                )
