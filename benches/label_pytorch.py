"""PyTorch reference for the pseudo-label benchmark: a DataLoader with workers decoding a folder
of PNG/JPEG images with PIL, then model inference, then the same top-k soft labels (example id,
uint16 class ids, float16 probabilities) written with numpy. Prints one JSON line.

Run by scripts/bench-label.sh beside `bench-label` on the same images, model and settings.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import WideResNet  # noqa: E402

EXTENSIONS = (".png", ".jpg", ".jpeg")


class Folder(torch.utils.data.Dataset):
    def __init__(self, root, size):
        self.files = sorted(
            os.path.join(d, f)
            for d, _, names in os.walk(root)
            for f in names
            if f.lower().endswith(EXTENSIONS)
        )
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image = Image.open(self.files[index]).convert("L")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        return index, torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())[None]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--mean", type=float, default=0.286)
    p.add_argument("--std", type=float, default=0.353)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = WideResNet(channels=1, classes=10).eval().to(device)
    autocast = torch.autocast("cuda", enabled=args.device == "cuda")
    dataset = Folder(args.images, args.image_size)
    out = tempfile.mkdtemp()
    # One forward before the clock (kernels chosen, memory allocated), as mentor's service runs
    # after its bare-forward measurement in the same process.
    with torch.no_grad(), autocast:
        model(torch.zeros(args.batch_size, 1, args.image_size, args.image_size, device=device))
    if args.device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shuffle=False,
        persistent_workers=False,
        pin_memory=args.device == "cuda",
    )
    ids, classes, probs = [], [], []
    with torch.no_grad(), autocast:
        for index, pixels in loader:
            x = (pixels.to(device, non_blocking=True).float() / 255.0 - args.mean) / args.std
            values, indices = model(x).float().softmax(-1).topk(args.top_k, -1)
            ids.append(index.numpy().astype(np.int64))
            classes.append(indices.cpu().numpy().astype(np.uint16))
            probs.append(values.cpu().numpy().astype(np.float16))
    path = os.path.join(out, "shard-00000.npz")
    np.savez(
        path,
        example_id=np.concatenate(ids),
        class_ids=np.concatenate(classes),
        probs=np.concatenate(probs),
    )
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "examples": len(dataset),
                "service_images_per_second": len(dataset) / seconds,
                "bytes_per_example": os.path.getsize(path) / len(dataset),
            }
        )
    )


if __name__ == "__main__":
    main()
