#!/usr/bin/env python3
"""PyTorch side of the model throughput benchmark.

Builds the same four architectures as the Rust (tch) implementation --
wrn-28-2, resnet18, bit-r50x1 and efficientnet-b0 -- and measures training
and inference throughput (images/s) on random data. Prints one JSON object
per model and mode on stdout, e.g.

  {"impl": "pytorch", "model": "resnet18", "mode": "train",
   "images_per_second": 123.4, "batch": 32, "image_size": 32, "params": 11181642}

Parameter counts and reference-count checks go to stderr.

A training step is forward (train mode) + cross-entropy + backward + SGD
(momentum 0.9, nesterov) step; inference is an eval-mode forward under
torch.inference_mode(). --channels-last runs the model and its input in PyTorch's
channels-last layout (impl "pytorch-channels-last"), the layout the project's models use on
the CPU.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

MODELS = ["wrn-28-2", "resnet18", "bit-r50x1", "efficientnet-b0"]


# ---------------------------------------------------------------- WRN-28-2
class WideBasic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(F.relu(self.bn2(o)))
        return o + residual


class WideResNet(nn.Module):
    def __init__(self, channels, classes, depth=28, k=2):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * k, 32 * k, 64 * k]
        self.conv = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        layers, cin = [], 16
        for width, stride in zip(widths, [1, 2, 2]):
            for i in range(n):
                layers.append(WideBasic(cin, width, stride if i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------- BiT R50x1
class StdConv2d(nn.Conv2d):
    """Conv2d with per-output-channel weight standardisation."""

    def forward(self, x):
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-10)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PreActBottleneck(nn.Module):
    def __init__(self, cin, cout, cmid, stride):
        super().__init__()
        self.gn1 = nn.GroupNorm(32, cin, eps=1e-5)
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn2 = nn.GroupNorm(32, cmid, eps=1e-5)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride, 1, bias=False)
        self.gn3 = nn.GroupNorm(32, cmid, eps=1e-5)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.gn1(x))
        residual = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.gn2(out)))
        out = self.conv3(F.relu(self.gn3(out)))
        return out + residual


class ResNetV2(nn.Module):
    def __init__(self, channels, classes, blocks=(3, 4, 6, 3), wf=1):
        super().__init__()
        self.root = nn.Sequential(
            StdConv2d(channels, 64 * wf, 7, 2, 3, bias=False),
            nn.ConstantPad2d(1, 0.0),
            nn.MaxPool2d(3, 2),
        )
        units, cin = [], 64 * wf
        for stage, n in enumerate(blocks):
            cout = 256 * wf * 2**stage
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                units.append(PreActBottleneck(cin, cout, cout // 4, stride))
                cin = cout
        self.body = nn.Sequential(*units)
        self.gn = nn.GroupNorm(32, cin, eps=1e-5)
        self.head = nn.Conv2d(cin, classes, 1, bias=True)

    def forward(self, x):
        x = F.relu(self.gn(self.body(self.root(x))))
        return torch.flatten(self.head(F.adaptive_avg_pool2d(x, 1)), 1)


# ----------------------------------------------------------------- factory
def adapt_conv(conv, channels):
    """Same conv geometry, different number of input channels."""
    return nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride,
                     conv.padding, bias=conv.bias is not None)


def build(name, channels, classes):
    if name == "wrn-28-2":
        return WideResNet(channels, classes)
    if name == "bit-r50x1":
        return ResNetV2(channels, classes)
    if name == "resnet18":
        m = torchvision.models.resnet18(num_classes=classes)
        if channels != 3:
            m.conv1 = adapt_conv(m.conv1, channels)
        return m
    if name == "efficientnet-b0":
        # Without dropout and stochastic depth, as mentor's benchmark builds its EfficientNet
        # (torchvision's defaults, 0.2 each, would make the reference do more work a step).
        m = torchvision.models.efficientnet_b0(
            num_classes=classes, dropout=0.0, stochastic_depth_prob=0.0
        )
        if channels != 3:
            m.features[0][0] = adapt_conv(m.features[0][0], channels)
        return m
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def report_param_counts(names, channels, classes):
    reference = {"resnet18": 11_689_512, "efficientnet-b0": 5_288_548}
    for name in MODELS:
        n1000 = count_params(build(name, 3, 1000))
        check = ""
        if name in reference:
            ok = n1000 == reference[name]
            check = f" ({'OK' if ok else 'MISMATCH, expected %d' % reference[name]})"
        print(f"# params {name}: 1000 classes/3 channels = {n1000:,}{check}", file=sys.stderr)
    for name in names:
        n = count_params(build(name, channels, classes))
        print(f"# params {name}: {classes} classes/{channels} channels = {n:,}", file=sys.stderr)


# ------------------------------------------------------------------- timing
def timed(step, device, warmup, iterations):
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(name, args, device):
    torch.manual_seed(0)
    model = build(name, args.channels, args.classes).to(device)
    x = torch.randn(args.batch, args.channels, args.image_size, args.image_size, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def train_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def infer_step():
        with torch.inference_mode():
            model(x)

    results = []
    for mode, step in (("train", train_step), ("inference", infer_step)):
        model.train(mode == "train")
        seconds = timed(step, device, args.warmup, args.iterations)
        results.append({
            "impl": "pytorch-channels-last" if args.channels_last else "pytorch", "model": name, "mode": mode,
            "images_per_second": args.batch * args.iterations / seconds,
            "batch": args.batch, "image_size": args.image_size,
            "params": count_params(model),
        })
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {','.join(MODELS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"# torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"device {device}, threads {torch.get_num_threads()}", file=sys.stderr)
    report_param_counts(names, args.channels, args.classes)
    for name in names:
        for result in bench(name, args, device):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
