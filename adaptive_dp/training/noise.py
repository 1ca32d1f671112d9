"""The noise generator of DP-SGD in a training run: its own seeded stream, apart from torch's global RNG.

opacus draws the Gaussian noise of every step from the ``noise_generator`` given to ``make_private``
(``torch.normal(..., generator=noise_generator)``). A dedicated generator has two uses here:

* exact resume: its state goes into every per-epoch checkpoint, so a run resumed at an epoch boundary
  draws the same noise as an uninterrupted one (same history, same weights);
* fresh noise for replayed steps: steps a crashed attempt took after its last checkpoint are lost from the
  model but booked (their releases happened); the resumed run replays those step indices, and the booking
  treats every release as an independent Gaussian mechanism. Restoring the checkpoint's generator state
  would redraw the very same normal samples for the replays (while σ may differ), so after lost steps
  :func:`reseed_after_lost_steps` re-seeds the generator from the number of releases booked so far: a
  stream no earlier attempt drew from.

``secure_mode`` engines draw from opacus' CSPRNG instead and are not touched here (the training CLI does not
use them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: spawn key that separates the noise stream from every other use of the run's seed ("noise" in ASCII).
NOISE_STREAM_TAG = 0x6E6F697365


def noise_seed(seed: int, *, booked_steps: int | None = None, resume_count: int | None = None) -> int:
    """The 64-bit seed of the noise generator.

    ``numpy.random.SeedSequence([seed, NOISE_STREAM_TAG])`` for a fresh run, and
    ``SeedSequence([seed, NOISE_STREAM_TAG, booked_steps, resume_count])`` for a resume after lost steps; the
    SeedSequence hash makes streams of different entropy words statistically independent.

    Args:
        seed: the run's seed, an integer ≥ 0.
        booked_steps: releases booked so far (kept + lost steps, every attempt); give with ``resume_count``.
        resume_count: 1 for the first resume, 2 for the second, ...

    Returns:
        An integer in [0, 2⁶⁴) for ``torch.Generator.manual_seed``.

    Raises:
        ValueError: if only one of ``booked_steps`` / ``resume_count`` is given, or any value is negative.
    """
    import numpy as np

    if (booked_steps is None) != (resume_count is None):
        raise ValueError("give both booked_steps and resume_count (a resume after lost steps), or neither")
    words = [seed, NOISE_STREAM_TAG] + ([] if booked_steps is None else [booked_steps, resume_count])
    if any(int(w) < 0 for w in words):
        raise ValueError(f"seed, booked_steps and resume_count must be integers >= 0, got {words}")
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, dtype=np.uint64)[0])


def make_noise_generator(seed: int, *, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (where opacus draws the noise: the parameters' device), seeded with
    :func:`noise_seed` of ``seed``."""
    import torch

    return torch.Generator(device=device).manual_seed(noise_seed(seed))


def reseed_after_lost_steps(
    generator: torch.Generator, *, seed: int, booked_steps: int, resume_count: int
) -> torch.Generator:
    """Re-seed ``generator`` for a resume that lost steps (see the module docstring); returns it.

    ``booked_steps`` grows with every lost step and never repeats between two resumes that lost steps, so
    each such resume draws from a stream of its own.
    """
    return generator.manual_seed(noise_seed(seed, booked_steps=booked_steps, resume_count=resume_count))
