"""In-process img/s of TorchScript models as a serving worker runs them: 1 torch thread, uint8 batches of 1 and 8.

python -m bench.model_speed models/gtsrb.pt [other.pt ...]
"""

import sys
import time
import warnings

import torch


def speed(model, batch: int, repeats: int = 5, seconds: float = 1.0) -> float:
    """Best img/s over ``repeats`` windows of ``seconds``, after a warm-up."""
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    best = 0.0
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        for _ in range(repeats):
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                model(x)
                n += batch
            best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchScript's deprecation notice
    for path in sys.argv[1:]:
        model = torch.jit.load(path, map_location="cpu").eval()
        for batch in (1, 8):
            ips = speed(model, batch)
            print(f"{path} batch {batch}: {ips:.0f} img/s, {1e3 * batch / ips:.2f} ms a batch (best of 5 x 1 s)")


if __name__ == "__main__":
    main()
