#!/usr/bin/env python3
"""Fashion-MNIST with 1,000 labels over several seeds (ALGORITHMS.md section 4): supervised on
1k labels, Noisy Student, Meta Pseudo Labels and supervised on (almost) all 60k labels, each a
real run through scripts/local-cluster.sh. Prints mean +- std per method and writes every run's
numbers to results.json in --out (default runs/results). --seeds are the training seeds; every
run of every seed trains on one labeled subset, the one drawn with --split-seed (default 0;
`data.split_seed` of each plan).

- supervised-1k: the round-1 teacher of the Noisy Student run (same model, same labeled subset);
- supervised-1k-student: the same with the Meta Pseudo Labels plan's student model and its
  dropout and stochastic depth (by default the Noisy Student students' model: one residual
  block, stochastic depth 0.8), the architecture of the final students;
- noisy-student: the last round's student of deploy/plans/fashion-mnist-noisy-student.toml;
- meta-pseudo-labels: the final (finetuned) student of deploy/plans/fashion-mnist-mpl.toml;
- mpl-distilled: one Noisy Student round after it (deploy/plans/fashion-mnist-mpl-distill.toml,
  or --distill-plan): the same seed's finetuned MPL student is the teacher (teacher.checkpoint,
  with the MPL plan's student model) of a wider noised student; it comes with
  meta-pseudo-labels;
- supervised-all: the teacher trained on 59,900 labels (100 images stay unlabeled because a
  Noisy Student run needs some), with a longer schedule (12,000 steps of 128 images, about 26
  epochs).

--methods picks some of the methods (supervised-1k comes with noisy-student); --reuse keeps a
finished run whose plan is unchanged (comments, layout and data.dir aside; a run directory
copied from another machine, such as a GPU machine's, counts) instead of running it again,
resumes an interrupted run of an unchanged plan where it stopped (a Meta Pseudo Labels joint
training from its last save, every mpl.checkpoint_every steps), and keeps the joint training of
a finished or interrupted Meta Pseudo Labels run whose plan changed in [mpl.finetune] alone,
finetuning under the new plan (local-cluster.sh --redo-finetune), and retries a failed run of an
unchanged plan from where it failed (local-cluster.sh --retry-failed); any other change runs
again from scratch. --quick runs the tiny test plans instead (seconds; to check the script, not for
numbers; supervised-all is then left out).
"""
import argparse
import fcntl
import json
import os
import re
import statistics
import subprocess
import sys
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_seed(text, seed, split_seed):
    """The plan with the training seed `seed`, on the labeled subset drawn with `split_seed`
    (`data.split_seed`): every seed trains on one subset (ALGORITHMS.md section 4)."""
    text = rewrite(text, r"^seed = \d+", f"seed = {seed}")
    if re.search(r"(?m)^split_seed = \d+", text):
        return rewrite(text, r"^split_seed = \d+", f"split_seed = {split_seed}")
    return rewrite(text, r"^(labeled_per_class = \d+[^\n]*)$", rf"\g<1>\nsplit_seed = {split_seed}",
                   "a `labeled_per_class = N` line in the [data] table")


def rewrite(text, pattern, replacement, need=None):
    """text with the first match of the multi-line regex pattern replaced; stops with a clear
    error (`need`, what the plan must hold, when given) when the plan does not have it,
    instead of silently running an unchanged plan."""
    text, count = re.subn(pattern, replacement, text, count=1, flags=re.M | re.S)
    if count == 0:
        raise SystemExit(f"results: {need or f'the plan no longer matches {pattern!r}'}")
    return text


def supervised_all(text):
    text = rewrite(text, r"^rounds = \d+", "rounds = 1")
    text = rewrite(text, r"^labeled_per_class = \d+.*?$", "labeled_per_class = 5990")
    text = rewrite(text, r"^\[teacher.train\]\nsteps = 600\nbatch_size = 64$",
                   "[teacher.train]\nsteps = 12000\nbatch_size = 128")
    return rewrite(text, r"(\[student.train\]\nsteps = )\d+", r"\g<1>100")


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    raise SystemExit(f"results: cannot write {value!r} into a plan")


def replace_table(text, name, table):
    """text with the plan table `[name]` (its header and key lines) replaced by `table`, or with
    `table` appended when the plan has no `[name]`."""
    block = f"[{name}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in table.items())
    pattern = rf"^{re.escape(f'[{name}]')}\n(?:[^\[\n][^\n]*\n)*"
    if re.search(pattern, text, flags=re.M):
        return rewrite(text, pattern, lambda _: block)
    return text.rstrip("\n") + "\n\n" + block


def mpl_student(mpl_text):
    """The Meta Pseudo Labels plan's [student] table (model and noise)."""
    try:
        student = tomllib.loads(mpl_text).get("student", {})
    except tomllib.TOMLDecodeError as error:
        raise SystemExit(f"results: the Meta Pseudo Labels plan does not parse: {error}")
    if "model" not in student:
        raise SystemExit("results: the Meta Pseudo Labels plan has no [student.model]")
    return student


def distilled(text, mpl_text, checkpoint):
    """The distillation plan of one seed: its teacher the MPL run's finetuned student, read from
    `checkpoint` into the MPL plan's [student.model]."""
    student = mpl_student(mpl_text)
    text = replace_table(text, "teacher.model", student["model"])
    return rewrite(text, r'^checkpoint = "[^"\n]*"$', f"checkpoint = {json.dumps(checkpoint)}",
                   'the distillation plan needs a `checkpoint = "..."` line in its [teacher] table')


def quick_distill(text):
    """The distillation plan cut to the tiny plans' data and a few steps (--quick)."""
    text = rewrite(text, r"^labeled_per_class = \d+$",
                   "labeled_per_class = 10\nunlabeled_limit = 1500\ntest_limit = 500")
    text = rewrite(text, r"(\[student.train\]\nsteps = )\d+", r"\g<1>30")
    return rewrite(text, r"^warmup_steps = \d+$", "warmup_steps = 5")


def supervised_1k_student(text, mpl_text):
    """supervised-1k with the Meta Pseudo Labels plan's student model and its dropout and
    stochastic depth in place of the teacher's (by default the Noisy Student plan's student: one
    residual block, stochastic depth 0.8): the baseline of the same architecture as the final
    students."""
    student = mpl_student(mpl_text)
    noise = {key: value for key, value in student.get("noise", {}).items()
             if key in ("dropout", "stochastic_depth_survival")}
    text = rewrite(text, r"^rounds = \d+", "rounds = 1")
    text = replace_table(text, "teacher.model", student["model"])
    # The run's short student phase (not measured) needs a student at least as large.
    text = replace_table(text, "student.model", student["model"])
    text = replace_table(text, "teacher.noise", noise)
    if not has_residual_blocks(student["model"]):
        # A new run refuses stochastic depth on a model without residual blocks: the short
        # student phase drops it (plans whose model has them keep their text, and --reuse).
        text = re.sub(r"^(\[student\.noise\]\n(?:[^\[\n][^\n]*\n)*?)stochastic_depth_survival = [^\n]*\n",
                      r"\g<1>", text, count=1, flags=re.M)
    return rewrite(text, r"(\[student.train\]\nsteps = )\d+", r"\g<1>100")


def has_residual_blocks(model):
    """Whether a plan's model table has residual blocks (where stochastic depth applies), as
    the plan's own check says."""
    if model.get("kind") == "cnn":
        return model.get("residual_blocks", 0) > 0
    return model.get("kind") != "densenet"


def read(path, parse=lambda f: f.read()):
    """The file's text (or what parse makes of it), None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return parse(f)
    except (OSError, ValueError):
        return None


def parsed(text):
    """A plan text as data to compare (comments and layout gone, and `data.dir`, which says
    where the data set lies, not what it is, as the coordinator takes it: a run made on another
    machine and copied here counts as this plan's); None when there is none or it does not
    parse."""
    try:
        plan = tomllib.loads(text) if text is not None else None
    except tomllib.TOMLDecodeError:
        return None
    if plan is not None:
        plan.get("data", {}).pop("dir", None)
        # A split seed left out is the run's seed (as `mentor plan` resolves it).
        plan.setdefault("data", {}).setdefault("split_seed", plan.get("seed", 0))
    return plan


def without_finetune(text):
    """A Meta Pseudo Labels plan as data, without its `[mpl.finetune]` (the part --redo-finetune
    may change), whether written inline or as a table; None when it does not parse."""
    plan = parsed(text)
    if plan is not None:
        plan.get("mpl", {}).pop("finetune", None)
    return plan


def refreshed(status, directory, args):
    """A finished run's status with the fields of this version and the paths of this place: a
    run saved before a field of `mentor status --json` existed (`final_student_checkpoint`), or
    made in another directory (on a GPU machine, say) and copied here, has its status read again
    from the run's state by `mentor status --state-dir` (whose paths follow the directory)."""
    moved = os.path.realpath(status.get("run_dir") or directory) != os.path.realpath(directory)
    if "final_student_checkpoint" in status and not moved:
        return status
    status = saved_status(directory, args)
    with open(os.path.join(directory, "status.json"), "w") as f:
        json.dump(status, f, indent=2)
    return status


def saved_status(directory, args):
    """The status the state of the run in `directory` records (`mentor status --state-dir`; an
    unfinished run's is `stopped`), with the paths of the directory where it is now."""
    mentor = os.path.join(args.bin_dir or os.path.join(os.environ["CARGO_TARGET_DIR"], "release"), "mentor")
    if not os.access(mentor, os.X_OK):
        subprocess.run(["cargo", "build", "--release", "--bin", "mentor"], cwd=ROOT, check=True)
    answer = subprocess.run([mentor, "status", "--state-dir", directory, "--json"],
                            stdout=subprocess.PIPE, text=True)
    if answer.returncode not in (0, 1, 3):
        raise SystemExit(f"results: `mentor status --state-dir {directory}` failed (exit {answer.returncode})")
    return json.loads(answer.stdout)


def held_by_a_coordinator(directory):
    """What the lock file of a run directory says when a live coordinator holds it, else None."""
    lock = os.path.join(directory, "coordinator.lock")
    try:
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "a coordinator"
    except FileNotFoundError:
        pass
    return None


def run(name, plan_text, seed, args):
    directory = os.path.join(os.path.abspath(args.out), f"{name}-seed{seed}")
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    plan = directory + ".toml"
    redo_finetune = resume = retry = False
    in_use = held_by_a_coordinator(directory)
    if in_use:
        raise SystemExit(f"results: {directory} is in use by a running coordinator ({in_use}); "
                         "stop it (or wait for it) first")
    if args.reuse:
        old_text = read(plan)
        old_status = read(os.path.join(directory, "status.json"), json.load)
        if old_status is None and os.path.exists(os.path.join(directory, "state.json")):
            # A run directory without the status local-cluster.sh leaves (copied from a GPU
            # machine by gpu-check.sh --mpl, say): its state tells.
            old_status = saved_status(directory, args)
        succeeded = old_status is not None and old_status.get("status") == "succeeded"
        old_plan = parsed(old_text)
        same = old_plan is not None and old_plan == parsed(plan_text)
        # A finished run is kept whatever processes ran it ([workers]: a data-parallel step
        # computes what one rank does with the same global batch), so that runs made on a GPU
        # machine with --workers 1 and here with 2 make one table.
        finished_same = same or (old_plan is not None
                                 and {**old_plan, "workers": None} == {**parsed(plan_text), "workers": None})
        if succeeded and finished_same:
            print(f"[results] {name}, seed {seed}: reusing the finished run in {directory}", file=sys.stderr, flush=True)
            return refreshed(old_status, directory, args)
        # An interrupted run of this plan (a redone finetune included) resumes where it stopped.
        state = read(os.path.join(directory, "state.json"), json.load)
        interrupted = state is not None and state.get("outcome", {}).get("status") == "running"
        resume = interrupted and same
        # A failed run of this plan goes on from where it failed (coordinator --retry-failed),
        # when its state says where (a coordinator from before 2026-12-05 did not).
        retry = (same and state is not None and state.get("outcome", {}).get("status") == "failed"
                 and state.get("failed_in") not in (None, "done"))
        # A finished or interrupted Meta Pseudo Labels run whose plan changed in its finetune
        # only keeps its joint training (an interrupted one resumes it) and finetunes under the
        # new plan.
        old_rest = without_finetune(old_text)
        redo_finetune = (not resume and (succeeded or interrupted) and name == "meta-pseudo-labels"
                         and old_rest is not None and old_rest == without_finetune(plan_text))
    with open(plan, "w") as f:
        f.write(plan_text)
    if resume:
        print(f"[results] {name}, seed {seed}: resuming the interrupted run in {directory}", file=sys.stderr, flush=True)
    elif retry:
        print(f"[results] {name}, seed {seed}: retrying the failed run in {directory} from where it failed "
              f"({state['outcome'].get('error')})", file=sys.stderr, flush=True)
    elif redo_finetune:
        # The old status must not pass for the new finetune's if this one is interrupted.
        if os.path.exists(os.path.join(directory, "status.json")):
            os.remove(os.path.join(directory, "status.json"))
        print(f"[results] {name}, seed {seed}: keeping the joint training in {directory} and "
              "finetuning under the new plan (only the finetune changed)", file=sys.stderr, flush=True)
    else:
        if os.path.exists(directory):
            # An earlier run of another plan (or one not asked to be reused) is kept aside, not
            # deleted: it may have cost hours.
            aside = f"{directory}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(directory, aside)
            print(f"[results] {name}, seed {seed}: the earlier run in {directory} is now {aside}",
                  file=sys.stderr, flush=True)
        print(f"[results] {name}, seed {seed}: running (logs in {directory}/logs)", file=sys.stderr, flush=True)
    command = [os.path.join(ROOT, "scripts", "local-cluster.sh"), "--plan", plan,
               "--workers", str(args.workers), "--state-dir", directory]
    if redo_finetune:
        command.append("--redo-finetune")
    elif retry:
        command.append("--retry-failed")
    if args.bin_dir:
        command += ["--bin-dir", args.bin_dir]
    if args.device:
        command += ["--device", args.device]
    cluster = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        returncode = cluster.wait()
    except KeyboardInterrupt:
        # local-cluster.sh stops its coordinator and workers on SIGTERM (a SIGKILL, what
        # subprocess.run sends, would leave them running); the joint training keeps its saves.
        cluster.terminate()
        cluster.wait()
        raise SystemExit(f"[results] interrupted; rerun with --reuse to resume {directory}")
    status = read(os.path.join(directory, "status.json"), json.load)
    if status is None:
        raise SystemExit(f"{name} seed {seed} failed (exit {returncode}) without a final status; "
                         f"see {directory}/logs")
    if returncode != 0 or status["status"] != "succeeded":
        raise SystemExit(f"{name} seed {seed} failed: {status.get('error')}")
    return status


def data_dir(text, directory, plan):
    """The plan with the `dir` of its [data] table set to `directory`."""
    lines = text.split("\n")
    table = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            table = stripped.split("]")[0].strip("[ ")
        elif table == "data" and re.match(r"dir\s*=", stripped):
            lines[index] = f"dir = {json.dumps(directory)}"
            return "\n".join(lines)
    raise SystemExit(f"results: --data needs a `dir = \"...\"` line in the [data] table of {plan}")


def with_workers(text, workers, plan, explicit):
    """The plan with `workers.min_workers` set to `workers`: every run starts once all its
    workers registered. A plan without the line runs as it is, unless --workers was given."""
    if explicit or re.search(r"(?m)^min_workers = \d+", text):
        return rewrite(text, r"^min_workers = \d+", f"min_workers = {workers}",
                       f"--workers needs a `min_workers = N` line in the [workers] table of {plan}")
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (`seed`), one run of each method per seed")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the labeled subset every run shares (`data.split_seed`, default 0)")
    parser.add_argument("--workers", type=int, help="workers per run (default 2)")
    parser.add_argument("--methods", default="noisy-student,meta-pseudo-labels,supervised-all,supervised-1k-student",
                        help="comma-separated subset of noisy-student, meta-pseudo-labels, supervised-all, "
                             "supervised-1k-student, mpl-distilled")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of unchanged plans (comments aside)")
    parser.add_argument("--bin-dir", help="prebuilt binaries (local-cluster.sh --bin-dir) instead of building")
    parser.add_argument("--device", help="device of every worker (local-cluster.sh --device), e.g. cuda:0")
    parser.add_argument("--mpl-plan", help="Meta Pseudo Labels plan (default deploy/plans/fashion-mnist-mpl.toml)")
    parser.add_argument("--distill-plan", help="the round after Meta Pseudo Labels of mpl-distilled "
                                               "(default deploy/plans/fashion-mnist-mpl-distill.toml)")
    parser.add_argument("--data", help="Fashion-MNIST directory (default: the plans' /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "results"), help="run directories and results.json")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = set(methods) - {"noisy-student", "meta-pseudo-labels", "supervised-all", "supervised-1k-student",
                              "mpl-distilled"}
    if unknown:
        parser.error(f"unknown method(s): {', '.join(sorted(unknown))}")
    plans = os.path.join(ROOT, "deploy", "plans")
    noisy_plan = os.path.join(plans, "tiny.toml" if args.quick else "fashion-mnist-noisy-student.toml")
    mpl_plan = args.mpl_plan or os.path.join(plans, "tiny-mpl.toml" if args.quick else "fashion-mnist-mpl.toml")
    noisy, mpl = open(noisy_plan).read(), open(mpl_plan).read()
    distill_plan = args.distill_plan or os.path.join(plans, "fashion-mnist-mpl-distill.toml")
    distill = open(distill_plan).read() if "mpl-distilled" in methods else None
    if distill is not None and args.quick and not args.distill_plan:
        distill = quick_distill(distill)
    # Every run starts once all its workers registered.
    explicit = args.workers is not None
    args.workers = args.workers or 2
    noisy = with_workers(noisy, args.workers, noisy_plan, explicit)
    mpl = with_workers(mpl, args.workers, mpl_plan, explicit)
    if distill is not None:
        distill = with_workers(distill, args.workers, distill_plan, explicit)
    if args.data:
        directory = os.path.abspath(args.data)
        noisy, mpl = data_dir(noisy, directory, noisy_plan), data_dir(mpl, directory, mpl_plan)
        if distill is not None:
            distill = data_dir(distill, directory, distill_plan)
    # The students' baseline is the Noisy Student plan with the MPL plan's student: made once.
    student_baseline = supervised_1k_student(noisy, mpl) if "supervised-1k-student" in methods else None
    rows = {"supervised-1k": [], "supervised-1k-student": [], "noisy-student": [],
            "meta-pseudo-labels": [], "mpl-distilled": [], "supervised-all": []}
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        if "noisy-student" in methods:
            status = run("noisy-student", with_seed(noisy, seed, args.split_seed), seed, args)
            rows["supervised-1k"].append(status["rounds"][0]["teacher_test_accuracy"])
            rows["noisy-student"].append(status["rounds"][-1]["student_test_accuracy"])
            runs.append({"seed": seed, "method": "noisy-student", "status": status})
        if "meta-pseudo-labels" in methods or "mpl-distilled" in methods:
            status = run("meta-pseudo-labels", with_seed(mpl, seed, args.split_seed), seed, args)
            rows["meta-pseudo-labels"].append(status["final_student_test_accuracy"])
            runs.append({"seed": seed, "method": "meta-pseudo-labels", "status": status})
        if "mpl-distilled" in methods:
            checkpoint = status.get("final_student_checkpoint")
            if not checkpoint:
                raise SystemExit(f"results: the Meta Pseudo Labels run of seed {seed} names no final student")
            status = run("mpl-distilled", distilled(with_seed(distill, seed, args.split_seed), mpl, checkpoint), seed, args)
            rows["mpl-distilled"].append(status["rounds"][-1]["student_test_accuracy"])
            runs.append({"seed": seed, "method": "mpl-distilled", "status": status})
        if "supervised-1k-student" in methods:
            status = run("supervised-1k-student", with_seed(student_baseline, seed, args.split_seed), seed, args)
            rows["supervised-1k-student"].append(status["rounds"][0]["teacher_test_accuracy"])
            runs.append({"seed": seed, "method": "supervised-1k-student", "status": status})
        if "supervised-all" in methods and not args.quick:
            status = run("supervised-all", supervised_all(with_seed(noisy, seed, args.split_seed)), seed, args)
            rows["supervised-all"].append(status["rounds"][0]["teacher_test_accuracy"])
            runs.append({"seed": seed, "method": "supervised-all", "status": status})
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "runs": runs}, f, indent=2)
    print(f"{'method':<20} {'test accuracy (mean +- std)':>28}  per seed ({args.seeds})")
    for method, values in rows.items():
        if not values:
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        each = ", ".join(f"{100 * v:.2f}" for v in values)
        print(f"{method:<20} {100 * statistics.mean(values):>20.2f} +- {100 * spread:.2f}  {each}")


if __name__ == "__main__":
    main()
