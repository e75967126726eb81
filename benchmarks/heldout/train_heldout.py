"""Train the held-out digits model of issue 14 (a check model: never tune defaults on it).

Same data, objective (DDPM epsilon) and recipe as the shipped digits UNet, but another seed (7),
narrower channels ([32, 48, 48] instead of [32, 64, 64]) and half the steps (1500), so it is a
different network of the same kind. Rebuild it (about 10-15 minutes on one CPU core) with::

    python benchmarks/heldout/train_heldout.py

It writes ``digits_unet.safetensors`` and ``digits_unet.json`` (plus the loss curve) into this
folder; ``benchmarks/iterations_study.py --model heldout`` loads it.
"""

from __future__ import annotations

from pathlib import Path

from fpsolve.models.digits import DEFAULT_UNET_CONFIG, train_digits

HERE = Path(__file__).parent
SEED = 7
STEPS = 1500
UNET_CONFIG = {**DEFAULT_UNET_CONFIG, "block_out_channels": [32, 48, 48]}


def main() -> None:
    """Train and save the held-out model into this folder."""
    result = train_digits(HERE, seed=SEED, steps=STEPS, unet_config=UNET_CONFIG, threads=1, progress=False)
    print(f"held-out digits UNet: {result['parameter_count']:,} parameters, {STEPS} steps in "
          f"{result['wall_time_s']:.0f} s, final loss {result['final_loss']:.4f}")


if __name__ == "__main__":
    main()
