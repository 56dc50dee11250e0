"""CPU speed of training.augment.TrainAugment against the closest kornia.augmentation pipeline (issue #14).

    python -m bench.augment_speed [--repeats 15] [--batches 4] [--threads 1,2]

Both get what the training loop gives TrainAugment: a uint8 [256, 3, 32, 32] batch (32-px frames; the model
upsamples to the recipe's resolution itself), with the recipe's ranges (training/configs/gtsrb.yaml). Each
figure includes the uint8 <-> float conversions. A and B alternate within every repeat, so that load from
other processes hits both alike. Printed: median wall and CPU ms per batch over the repeats, the fastest
wall time, and kornia / TrainAugment for each. CPU time is the steadier figure on a shared machine: it does
not count time spent waiting for a core.
"""

import argparse
import math
import statistics
import time

import kornia
import kornia.augmentation as K
import torch

from training import train


def kornia_augment(args) -> torch.nn.Module:
    """TrainAugment's operations and ranges in kornia; where kornia has no exact equivalent, the closest one."""
    seq = K.AugmentationSequential(
        # TrainAugment builds R(rot) @ shear_x, zooms by the drawn scale and shifts by up to translate * size.
        K.RandomAffine(
            degrees=args.degrees, translate=(args.translate, args.translate), scale=(args.scale_min, args.scale_max),
            shear=(-args.shear, args.shear), padding_mode="border", p=1.0,
        ),
        # Same formulas (multiply, blend with the grey mean, blend with grey) in TrainAugment's fixed order;
        # kornia clamps to [0, 1] after each step, TrainAugment only at the end.
        K.ColorJitter(args.color_jitter, args.color_jitter, args.color_jitter, order=(0, 1, 2), p=1.0),
        # TrainAugment blends the image with a 3x3 sigma~1 blur by a weight in [0.3, 1]: about a 3x3
        # Gaussian of sigma 0.46 (weight 0.3) to 0.97 (weight 1).
        K.RandomGaussianBlur((3, 3), (0.46, 0.97), border_type="replicate", p=args.blur_p),
        # Same area range; aspect ratio in [1/e, e] as TrainAugment, but kornia keeps the rectangle inside the
        # image where TrainAugment's may be cut by the border.
        K.RandomErasing(scale=(0.02, 0.12), ratio=(math.exp(-1), math.e), value=0.0, p=args.erase_p),
    )  # fmt: skip

    def augment(x: torch.Tensor) -> torch.Tensor:
        return (seq(x.float() / 255) * 255).round_().to(torch.uint8)

    return augment


def ms_per_batch(fn, x: torch.Tensor, batches: int) -> tuple[float, float]:
    """Wall-clock and CPU (all threads of this process) milliseconds per batch."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        fn(x)
    return (time.perf_counter() - wall) * 1e3 / batches, (time.process_time() - cpu) * 1e3 / batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batches", type=int, default=4, help="batches per timing")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", default="1,2")
    a = p.parse_args()
    recipe = train.parse_args([])
    fns = {"TrainAugment": train.make_augment(recipe), "kornia": kornia_augment(recipe)}
    x = torch.randint(0, 256, (a.batch_size, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, kornia {kornia.__version__}, batch {a.batch_size}x3x32x32 uint8, CPU")
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
        for fn in fns.values():
            ms_per_batch(fn, x, 2)  # warm-up
        for i in range(a.repeats):
            order = list(fns) if i % 2 == 0 else list(fns)[::-1]  # A/B, then B/A
            for name in order:
                times[name].append(ms_per_batch(fns[name], x, a.batches))
        wall = {n: statistics.median(w for w, _ in t) for n, t in times.items()}
        cpu = {n: statistics.median(c for _, c in t) for n, t in times.items()}
        best = {n: min(w for w, _ in t) for n, t in times.items()}
        print(f"threads {threads}:")
        for n in fns:
            print(
                f"  {n:12s} wall median {wall[n]:7.1f} ms/batch (min {best[n]:.1f}), CPU median {cpu[n]:7.1f} ms/batch"
            )
        print(
            f"  kornia / TrainAugment: wall median {wall['kornia'] / wall['TrainAugment']:.2f}, "
            f"wall min {best['kornia'] / best['TrainAugment']:.2f}, CPU median {cpu['kornia'] / cpu['TrainAugment']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
