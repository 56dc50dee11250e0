"""Where a training step goes: img/s of each stage of the student's loop, on random frames, one batch size.

    python -m bench.train_profile                      # 96-px student, CNN teacher, batch 256, 1 torch thread
    python -m bench.train_profile --threads 2 --steps 8

Stages, as training/train.py runs them: batch slicing from the preloaded uint8 frames (train.BatchSampler),
TrainAugment (per-sample affine, photometry, blur, erasing), the teacher's forward pass (no grad), the student's
forward + backward + AdamW step. Prints one markdown table (the numbers training/README.md quotes).
"""

import argparse
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from handler.presets import to_network_layout
from training.augment import TrainAugment
from training.model import ARCH, TEACHER_ARCH, create_model
from training.train import BatchSampler


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, b = 39_209, args.batch_size
    images, labels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 43, (n,))
    batches = iter(BatchSampler(images, labels, SimpleNamespace(batch_size=b, seed=0, balance=0.0)))
    augment = TrainAugment(degrees=15, translate=0.1, scale=(0.8, 1.2), shear=8, color_jitter=0.4, blur_p=0.2,
                           erase_p=0.25)  # fmt: skip
    x, y = next(batches)
    xa = to_network_layout(augment(x))
    teacher = create_model(43, 32, arch=TEACHER_ARCH).to(memory_format=torch.channels_last).eval()
    student = create_model(43, args.resolution, arch=ARCH, drop_rate=0.2, drop_path_rate=0.05)
    student = student.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)

    def step():
        loss = F.cross_entropy(student(xa), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def teach():
        with torch.no_grad():
            teacher(xa)

    stages = {
        "batch slicing (BatchSampler)": timed(lambda: next(batches), args.steps),
        "augmentation (TrainAugment)": timed(lambda: augment(x), args.steps),
        "teacher forward (no grad)": timed(teach, args.steps),
        f"student forward+backward+step @ {args.resolution} px": timed(step, args.steps),
    }
    total = sum(stages.values())
    print(f"batch {b}, {args.threads} torch thread(s), {args.steps} timed steps each\n")
    print("| stage | ms / batch | img/s | share |\n|---|---:|---:|---:|")
    for name, s in stages.items():
        print(f"| {name} | {s * 1e3:.0f} | {b / s:,.0f} | {s / total:.0%} |")
    print(f"| **distilled step, all stages** | {total * 1e3:.0f} | {b / total:,.0f} | |")
    no_teacher = total - stages["teacher forward (no grad)"]
    print(f"| labels-only step (no teacher) | {no_teacher * 1e3:.0f} | {b / no_teacher:,.0f} | |")
    print(f"\nepoch of {n:,} frames: distilled ~{n / b * total:.0f} s, labels only ~{n / b * no_teacher:.0f} s")


if __name__ == "__main__":
    main()
