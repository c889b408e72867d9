#!/usr/bin/env python3
"""PyTorch DDP (gloo) training throughput on Fashion-MNIST, for scripts/bench-ddp.sh.

The same model as the project's `cnn` (width 32, hidden 128, batch norm), the same global batch
split over --world-size processes (1 thread each), SGD with Nesterov momentum 0.9, weight decay
5e-4 on weights only (not on biases and batch-norm parameters, as the workers), label smoothing
0.1, no augmentation. Rank 0 prints img/s as a JSON line. --channels-last runs the model and
its inputs in PyTorch's channels-last layout, as the workers do on the CPU.
"""
import argparse
import gzip
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


def load_images(path):
    with gzip.open(path) as f:
        data = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return torch.from_numpy(data.copy()).view(-1, 1, 28, 28)


def load_labels(path):
    with gzip.open(path) as f:
        data = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return torch.from_numpy(data.astype(np.int64))


class Cnn(nn.Module):
    def __init__(self, width=32, hidden=128, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.hidden = nn.Linear(2 * width * 49, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.classifier(F.relu(self.hidden(x.flatten(1))))


def run(rank, args):
    torch.set_num_threads(1)
    if args.world_size > 1:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(args.port)
        dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    images = load_images(os.path.join(args.data, "train-images-idx3-ubyte.gz"))
    labels = load_labels(os.path.join(args.data, "train-labels-idx1-ubyte.gz"))
    unit = images.float() / 255.0
    mean, std = unit.mean().item(), unit.std().item()
    torch.manual_seed(0)
    model = Cnn()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    undecayed = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.SGD([{"params": decayed}, {"params": undecayed, "weight_decay": 0.0}],
                                lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    local = args.batch // args.world_size
    started = time.perf_counter()
    for _ in range(args.steps):
        picks = torch.randint(0, images.shape[0], (args.batch,), generator=generator)
        picks = picks[rank * local:(rank + 1) * local]
        x = (images[picks].float() / 255.0 - mean) / std
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), labels[picks], label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    if rank == 0:
        impl = "pytorch-channels-last" if args.channels_last else "pytorch"
        print(json.dumps({"impl": impl, "world_size": args.world_size, "batch": args.batch,
                          "steps": args.steps, "seconds": seconds,
                          "images_per_second": args.batch * args.steps / seconds,
                          "final_loss": loss.item()}), flush=True)
    if args.world_size > 1:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and inputs in torch.channels_last")
    args = parser.parse_args()
    if args.world_size == 1:
        run(0, args)
    else:
        mp.spawn(run, args=(args,), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
