#!/usr/bin/env python3
"""The Meta Pseudo Labels step in PyTorch, for scripts/bench-mpl.sh: the reference the workers'
step (`bench-mpl`) is measured against, in the same run, on the same machine.

It takes the settings `bench-mpl` printed (--settings, one JSON object: the models, batch sizes,
noise and losses of the plan) and runs what a PyTorch user would write for them:
- the batches: `labeled_per_class` labeled images per class and the other training images
  unlabeled, sampled with replacement; per image, a random flip and a 2-pixel shift (the weak
  view) and torchvision's RandAugment of it (the strong view), in the training loop. This is
  similar work, not the same: torchvision has 14 operations with its own ranges, the workers
  the plan's list (15 by default) and its optional cutout;
- the step (ALGORITHMS.md section 2, as in crates/mentor-worker/src/mpl.rs): the teacher on
  cat(labeled, weak, strong), its label-smoothed labeled loss and the UDA loss, the student's
  step on the teacher's hard pseudo labels, `h` from the student's labeled loss before and after
  it, the teacher's step with the h-weighted term; SGD with Nesterov momentum and weight decay
  on weights only; then the student's EMA.
The batches are timed apart from the steps (batch_seconds, step_seconds); the steps cycle
through the first --distinct-batches batches (20), which costs a step nothing and spares minutes
of drawing batches image by image. With --device cuda the
models run on the GPU and each batch is moved there as it is made (part of batch_seconds); the
clock is read after torch.cuda.synchronize(). One JSON line.
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from ddp_train import load_images, load_labels


class ConvBn(nn.Module):
    def __init__(self, cin, cout, batch_norm):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()

    def forward(self, x):
        return self.bn(self.conv(x))


def block_survival(index, blocks, last):
    """Survival probability of residual block `index` of `blocks`: the workers' linear rule."""
    return 1.0 - (index + 1) / max(blocks, 1) * (1.0 - last)


class Block(nn.Module):
    def __init__(self, channels, batch_norm, survival):
        super().__init__()
        self.first = ConvBn(channels, channels, batch_norm)
        self.second = ConvBn(channels, channels, batch_norm)
        self.survival = survival

    def forward(self, x):
        r = self.second(F.relu(self.first(x)))
        if self.training and self.survival < 1.0:
            keep = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.survival).to(r.dtype)
            r = r * keep / self.survival
        return F.relu(x + r)


class Cnn(nn.Module):
    """The project's `cnn`: two conv-bn-relu-maxpool stages, residual blocks, hidden, dropout."""

    def __init__(self, model, classes):
        super().__init__()
        width, norm, blocks = model["width"], model["batch_norm"], model["residual_blocks"]
        self.stage1 = ConvBn(1, width, norm)
        self.stage2 = ConvBn(width, 2 * width, norm)
        self.blocks = nn.Sequential(
            *[Block(2 * width, norm, block_survival(i, blocks, model["last_survival"]))
              for i in range(blocks)])
        self.hidden = nn.Linear(2 * width * 7 * 7, model["hidden"])
        self.classifier = nn.Linear(model["hidden"], classes)
        self.dropout = model["dropout"]
        # `precision = "bfloat16"`: autocast, as the workers run it, with 32-bit logits.
        self.bfloat16 = model.get("precision", "float32") == "bfloat16"

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bfloat16):
            x = F.max_pool2d(F.relu(self.stage1(x)), 2)
            x = F.max_pool2d(F.relu(self.stage2(x)), 2)
            x = F.relu(self.hidden(self.blocks(x).flatten(1)))
            logits = self.classifier(F.dropout(x, self.dropout, self.training))
        return logits.float()


def sgd(model, rate, s):
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    undecayed = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.SGD([{"params": decayed}, {"params": undecayed, "weight_decay": 0.0}],
                           lr=rate, momentum=s["momentum"], nesterov=s["momentum"] > 0,
                           weight_decay=s["weight_decay"])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settings", required=True, help="the settings line of bench-mpl")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--distinct-batches", type=int, default=20,
                        help="batches drawn (and timed); the steps cycle through them")
    parser.add_argument("--channels-last", action="store_true",
                        help="models and inputs in torch.channels_last")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory for reuse, as mentor's workers set it "
                             "(one arena, no mmap per large block, no trim below 2 GB)")
    args = parser.parse_args()
    if args.keep_freed_memory:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD: what mentor_worker::memory sets.
        for param, value in ((-8, 1), (-4, 0), (-1, 2**31 - 1)):
            if libc.mallopt(param, value) != 1:
                raise SystemExit(f"mallopt({param}, {value}) was refused")
    s = json.loads(args.settings)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    device = torch.device(args.device)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    images = load_images(os.path.join(s["data"], "train-images-idx3-ubyte.gz"))
    labels = load_labels(os.path.join(s["data"], "train-labels-idx1-ubyte.gz"))
    unit = images.float() / 255.0
    mean, std = unit.mean().item(), unit.std().item()
    generator = torch.Generator().manual_seed(s["seed"])
    labeled = torch.cat([
        torch.nonzero(labels == c).flatten()[
            torch.randperm(int((labels == c).sum()), generator=generator)[:s["labeled_per_class"]]]
        for c in range(s["classes"])])
    is_labeled = torch.zeros(len(labels), dtype=torch.bool)
    is_labeled[labeled] = True
    unlabeled = torch.nonzero(~is_labeled).flatten()

    weak = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomCrop(28, padding=2)])
    # The plan's magnitude is a tenth of each operation's range; torchvision's has 31 bins.
    strong = v2.RandAugment(num_ops=s["randaugment_ops"],
                            magnitude=round(s["randaugment_magnitude"] / 10 * 30))
    batch_size, unlabeled_size = s["batch_size"], s["batch_size"] * s["mu"]

    def model_input(views):
        return ((torch.stack(views).to(device).float() / 255.0 - mean) / std).contiguous(
            memory_format=layout)

    def draw():
        picks = labeled[torch.randint(0, len(labeled), (batch_size,), generator=generator)]
        rows = unlabeled[torch.randint(0, len(unlabeled), (unlabeled_size,), generator=generator)]
        weak_views = [weak(images[i]) for i in rows]
        strong_views = [strong(view) for view in weak_views]
        labeled_views = [weak(images[i]) for i in picks]
        return (model_input(labeled_views), labels[picks].to(device), model_input(weak_views),
                model_input(strong_views))

    total = args.warmup + args.steps
    # The steps cycle through at most --distinct-batches batches: a step costs the same whatever
    # its images, and drawing hundreds of batches image by image would take minutes.
    distinct = max(1, min(total, args.distinct_batches))
    # The device is set up before the clock starts, as on the workers' side.
    torch.zeros(1, device=device)
    synchronize()
    started = time.perf_counter()
    batches = [draw() for _ in range(distinct)]
    synchronize()
    batch_seconds = (time.perf_counter() - started) / distinct

    classes = s["classes"]
    teacher = Cnn(s["teacher"], classes).to(device, memory_format=layout)
    student = Cnn(s["student"], classes).to(device, memory_format=layout)
    ema = Cnn(s["student"], classes).to(device, memory_format=layout)
    ema.load_state_dict(student.state_dict())
    teacher_optimizer = sgd(teacher, s["teacher_learning_rate"], s)
    student_optimizer = sgd(student, s["student_learning_rate"], s)
    smoothing, decay = s["label_smoothing"], s["ema"]
    # h, its baseline and the losses stay tensors on the device, as on the workers' side: a
    # .item() a step would make the host wait for the GPU twice a step.
    baseline = torch.zeros((), device=device)
    # The EMA's floating-point tensors are updated with one fused call, the others copied.
    ema_float, student_float, ema_other, student_other = [], [], [], []
    for e, v in zip(ema.state_dict().values(), student.state_dict().values()):
        if e.dtype.is_floating_point:
            ema_float.append(e)
            student_float.append(v)
        else:
            ema_other.append(e)
            student_other.append(v)

    for step in range(total):
        x_l, y_l, x_uw, x_us = batches[step % distinct]
        if step == args.warmup:
            synchronize()
            started = time.perf_counter()
        n_l, n_u = x_l.shape[0], x_uw.shape[0]
        t_logits = teacher(torch.cat([x_l, x_uw, x_us]))
        t_l, t_uw, t_us = t_logits.split([n_l, n_u, n_u])
        t_loss_l = F.cross_entropy(t_l, y_l, label_smoothing=smoothing)
        q = torch.softmax(t_uw.detach() / s["uda_temperature"], -1)
        mask = (q.max(-1).values >= s["uda_threshold"]).float()
        t_loss_uda = (-(q * F.log_softmax(t_us, -1)).sum(-1) * mask).mean()
        pseudo = t_us.detach().argmax(-1)

        s_logits = student(torch.cat([x_l, x_us]))
        s_l, s_us = s_logits.split([n_l, n_u])
        s_old = F.cross_entropy(s_l.detach(), y_l)
        s_loss = F.cross_entropy(s_us, pseudo, label_smoothing=smoothing)
        student_optimizer.zero_grad(set_to_none=True)
        s_loss.backward()
        student_optimizer.step()
        with torch.no_grad():
            s_new = F.cross_entropy(student(x_l), y_l)
        h = s_old - s_new if s["mpl_sign"] == "theory" else s_new - s_old
        if s["baseline_decay"] > 0:
            baseline = s["baseline_decay"] * baseline + (1 - s["baseline_decay"]) * h
            h -= baseline

        ramp = min(step / s["uda_steps"], 1.0) if s["uda_steps"] > 0 else 1.0
        t_loss_mpl = F.cross_entropy(t_us, pseudo)
        t_loss = t_loss_l + s["lambda_u"] * ramp * t_loss_uda + s["mpl_weight"] * h * t_loss_mpl
        teacher_optimizer.zero_grad(set_to_none=True)
        t_loss.backward()
        teacher_optimizer.step()

        if decay > 0:
            with torch.no_grad():
                torch._foreach_lerp_(ema_float, student_float, 1 - decay)
                for e, v in zip(ema_other, student_other):
                    e.copy_(v)
    synchronize()
    step_seconds = (time.perf_counter() - started) / args.steps
    print(json.dumps({
        "impl": "pytorch-channels-last" if args.channels_last else "pytorch",
        "device": args.device,
        "threads": args.threads, "steps": args.steps, "step_seconds": step_seconds,
        "batch_seconds": batch_seconds, "final_h": float(h),
        "final_student_labeled_loss": float(s_new)}), flush=True)


if __name__ == "__main__":
    main()
