"""The demo: four training runs on the embedded ConceptShapes data, then TensorBoard.

    python demo/run.py                      # train + log (a few minutes on 2 CPU cores), then serve
    python demo/run.py --no-serve           # train + log, then exit
    python demo/run.py --check --logdir D   # print the reproduced discoveries; non-zero exit on failure
    python demo/run.py --seeds 3 --no-serve --logdir D    # the demo for training seeds 0, 1, 2 (D/seed0 ...)
    python demo/run.py --check --seeds 3 --logdir D       # the discoveries over those seeds (ranges)

Runs (same small CNN, same seeds, only the training setup differs):

* ``baseline``     SGD lr 0.05, dropout 0.3, weight decay 5e-4, 2,000 training images
* ``lr_too_high``  the same with lr 0.5 (the papers' failure case)
* ``overfit``      no dropout, no weight decay, 250 training images
* ``diverse``      the baseline plus the concept-diversity regularizer (Concept-Monitor
                   Sec. 4) on ``features.12``: ``L = CE + 0.1 * d_anchor_batch``, concept
                   activations from ConceptShapes' ground-truth annotations (beta = 1 as
                   in the paper stops this small network learning: chance accuracy)

Every run logs ``train/diversity_loss``, the regularizer's batch ``d_anchor`` (added to
the loss only in ``diverse``).

Every epoch ``writer.add_concepts`` places all 176 neurons in a text-anchored space
(Network Dissection on the probe masks + the offline MiniLM text encoder).  At the end
a ConceptEvo space is fitted from the baseline's last snapshot and back-filled into
every run, and the importance of concept evolutions for one class is logged.

The networks train and are recorded in float64, on a fixed number of threads.  In
float32, rounding differences between CPU code paths (``ATEN_CPU_CAPABILITY``, thread
counts, vendor BLAS kernels) of 1e-7 grow through training into different networks; in
float64 they stay below the printed precision for ``baseline`` and ``overfit``.
``lr_too_high`` and ``diverse`` train chaotically even in float64, so their figures vary
with the CPU code path (``demo/check.py`` marks them).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

IMAGE_SIZE = 32
PROBE_IMAGES = 512
TEST_IMAGES = 1200
SEED = 0                      # the default training seed (--seed)
#: torch threads inside the demo whatever the machine or OMP_NUM_THREADS says, so
#: every machine runs the same kernels in the same order
THREADS = 2
IMPORTANCE_CLASS = 0          # "circle"
IMPORTANCE_FROM_EPOCH = 1


@dataclass(frozen=True)
class Setup:
    lr: float
    dropout: float
    weight_decay: float
    n_train: int
    diversity: float = 0.0    # beta of the concept-diversity regularizer (0: off)


RUNS = {
    "baseline": Setup(lr=0.05, dropout=0.3, weight_decay=5e-4, n_train=2000),
    "lr_too_high": Setup(lr=0.5, dropout=0.3, weight_decay=5e-4, n_train=2000),
    "overfit": Setup(lr=0.05, dropout=0.0, weight_decay=0.0, n_train=250),
    "diverse": Setup(lr=0.05, dropout=0.3, weight_decay=5e-4, n_train=2000, diversity=0.1),
}
DIVERSITY_LAYER = "features.12"


def make_text_space(probe):
    from tb_conceptevo.detectors import MiniLMTextEncoder, NetDissect
    from tb_conceptevo.spaces import TextSpace

    detector = NetDissect(vocabulary=probe.vocabulary, progress=False)
    # Anchors: every concept word of the probe set, so d_anchor measures how much of
    # the vocabulary the layer's neurons cover (lower = more diverse).
    return TextSpace(detector, text_encoder=MiniLMTextEncoder(),
                     anchors=list(probe.vocabulary.names))


def make_model(n_classes, dropout, seed):
    """The demo CNN, initialised in float64 (float32 init differs by 1 ulp between CPU
    code paths, and training amplifies it)."""
    import torch

    from demo.model import DemoCNN

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return DemoCNN(n_classes=n_classes, dropout=dropout)
    finally:
        torch.set_default_dtype(previous)


def accuracy(model, images, labels, batch_size=256):
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            correct += (model(images[start:start + batch_size]).argmax(1) == labels[start:start + batch_size]).sum()
    model.train()
    return float(correct) / len(images)


def train_run(name, setup, logdir, epochs, probe, space, test, seed=SEED, progress=True):
    import torch
    from tqdm.auto import tqdm

    from tb_conceptevo import ConceptWriter
    from tb_conceptevo.probes import ConceptShapes
    from tb_conceptevo.regularizer import ConceptDiversityLoss, GroundTruthConcepts

    train_set = ConceptShapes(n=setup.n_train, size=IMAGE_SIZE, seed=1)
    x_train = train_set.images(range(len(train_set))).double()
    y_train = torch.as_tensor(train_set.labels)
    x_test, y_test = test
    model = make_model(len(train_set.class_names), setup.dropout, seed)
    # every run measures the regularizer's batch d_anchor; only ``diverse`` trains with it
    regularizer = ConceptDiversityLoss(space, source=GroundTruthConcepts(train_set, concepts=space.concepts))
    regularizer.attach(model, DIVERSITY_LAYER)
    optimiser = torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=0.9, weight_decay=setup.weight_decay)
    writer = ConceptWriter(os.path.join(logdir, name), probe=probe, k=10, batch_size=256,
                           spaces=[space], progress=False)
    generator = torch.Generator().manual_seed(seed)
    snapshots = {}
    # A fixed number of optimisation steps per epoch for every run, so the runs differ
    # only in their setup, not in how much they trained.
    steps_per_epoch = 2000 // 64
    writer.add_concepts(model, step=0)
    snapshots[0] = {k: v.clone() for k, v in model.state_dict().items()}
    bar = tqdm(range(1, epochs + 1), desc=f"{name:12s}" + (f" seed {seed}" if seed != SEED else ""),
               disable=not progress)
    for epoch in bar:
        model.train()
        total = diversity_total = 0.0
        for _ in range(steps_per_epoch):
            batch = torch.randint(0, len(x_train), (64,), generator=generator)
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            diversity = regularizer(indices=batch)
            if setup.diversity:
                loss = loss + setup.diversity * diversity
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
            diversity_total += float(diversity.detach())
        train_acc = accuracy(model, x_train, y_train)
        test_acc = accuracy(model, x_test, y_test)
        writer.add_scalar("train/loss", total / steps_per_epoch, epoch)
        writer.add_scalar("train/diversity_loss", diversity_total / steps_per_epoch, epoch)
        writer.add_scalar("train/accuracy", train_acc, epoch)
        writer.add_scalar("test/accuracy", test_acc, epoch)
        writer.add_concepts(model, step=epoch)
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        bar.set_postfix(train=f"{train_acc:.2f}", test=f"{test_acc:.2f}")
    if name == "baseline":
        before = make_model(len(train_set.class_names), setup.dropout, seed)
        before.load_state_dict(snapshots[IMPORTANCE_FROM_EPOCH])
        writer.add_concept_importance(model, IMPORTANCE_CLASS, x_test, epochs, labels=y_test,
                                      from_model=before, from_step=IMPORTANCE_FROM_EPOCH, revert=True)
    writer.close()


def log_everything(logdir, epochs, seed=SEED, progress=True):
    import torch

    from tb_conceptevo.probes import ConceptShapes
    from tb_conceptevo.reading import ConceptReader

    torch.set_num_threads(THREADS)
    started = time.time()
    probe = ConceptShapes(n=PROBE_IMAGES, size=IMAGE_SIZE, seed=0)
    test_set = ConceptShapes(n=TEST_IMAGES, size=IMAGE_SIZE, seed=2)
    test = (test_set.images(range(len(test_set))).double(), torch.as_tensor(test_set.labels))
    space = make_text_space(probe)
    for name, setup in RUNS.items():
        train_run(name, setup, logdir, epochs, probe, space, test, seed, progress)
    # ConceptEvo: fit the unified space on the baseline's last snapshot, back-fill all runs.
    with ConceptReader(logdir) as logs:
        base = logs.observation("baseline")
    from tb_conceptevo.spaces import ConceptEvoSpace

    # the check's robustness rows refit with this space's parameters, read from its file
    evo = ConceptEvoSpace(random_state=seed, progress=progress)
    evo.fit(base)
    space_path = os.path.join(logdir, "conceptevo_space.npz")
    evo.save(space_path)
    from tb_conceptevo.cli.space import project_logdir

    project_logdir(logdir, evo, progress=progress)
    print(f"logged {len(RUNS)} runs x {epochs + 1} snapshots in {time.time() - started:.0f} s -> {logdir}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(logdir, port):
    port = port or free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command)
    print(f"\nTensorBoard: http://127.0.0.1:{port}/#conceptevo   (Ctrl-C to stop)\n", flush=True)

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    # SIGTERM (kill, a supervisor, a closed terminal) stops TensorBoard too, as Ctrl-C does.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", action="append", default=None,
                        help="where to log (default runs/demo); with --check it may be given several times")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--no-serve", action="store_true", help="train and log, then exit")
    parser.add_argument("--check", action="store_true", help="check the logged discoveries and exit")
    parser.add_argument("--port", type=int, default=0, help="TensorBoard port (default: a free one)")
    parser.add_argument("--force", action="store_true", help="log again even if the logdir has the runs")
    parser.add_argument("--seed", type=int, default=SEED, help="training seed (init, batches, dropout, space fit)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="log (or check) the demo for seeds 0..N-1, one subfolder seed<i> of --logdir each")
    parser.add_argument("--markdown", action="store_true", help="with --check: print the table as Markdown only")
    parser.add_argument("--label", default=None, help="with --check: what the logdirs are, for the table header")
    args = parser.parse_args(argv)
    roots = args.logdir or [os.path.join("runs", "demo")]
    seeds = [args.seed] if args.seeds is None else list(range(args.seeds))
    logdirs = [root if args.seeds is None else os.path.join(root, f"seed{s}") for root in roots for s in seeds]
    if args.check:
        from demo.check import check

        label = args.label or (f"seed {args.seed}" if args.seeds is None else f"seeds 0-{args.seeds - 1}")
        return check(logdirs, markdown=args.markdown, label=label)
    if len(roots) > 1:
        parser.error("give one --logdir to log into (several only with --check)")
    args.logdir = roots[0]
    for seed, logdir in zip(seeds, logdirs):
        done = all(os.path.isdir(os.path.join(logdir, run)) for run in RUNS) and \
            os.path.exists(os.path.join(logdir, "conceptevo_space.npz"))
        if done and not args.force:
            print(f"{logdir} already holds the demo runs (use --force to log them again)")
            continue
        if os.path.isdir(logdir) and args.force:
            import shutil

            shutil.rmtree(logdir)
        log_everything(logdir, args.epochs, seed)
    if not args.no_serve:
        serve(args.logdir, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
