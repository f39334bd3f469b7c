"""``tb-conceptevo fit-space`` and ``tb-conceptevo project``: ConceptEvo after training.

Fit the unified space from observations already logged (e.g. the last step of the
best run), then back-fill embeddings and layouts into every run and step::

    tb-conceptevo fit-space --logdir runs --run baseline --out space.npz
    tb-conceptevo project --logdir runs --space space.npz

    # a refit (other seed or dim) goes next to the first, under its own name:
    tb-conceptevo fit-space --logdir runs --run baseline --out space_dim10.npz --dim 10
    tb-conceptevo project --logdir runs --space space_dim10.npz --name conceptevo_dim10

``project`` writes under ``conceptevo/space/<space>/<layer>`` (new tags), in ascending
step order, only for the steps and layers not back-filled yet: running it twice
changes nothing.  A space whose content differs from the one already logged under
its name (it places a logged step elsewhere) is refused before anything is written;
give it its own name with ``--name``.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional


def register(subparsers) -> None:
    fit = subparsers.add_parser(
        "fit-space", help="fit a ConceptEvo space from logged observations",
        description="Fit a ConceptEvo space (Steps 1 and 2.1) on the observations of one logged run and "
                    "step; no probe is needed (the logged stimuli carry the probe hash).\n\nexample:\n\n"
                    "    tb-conceptevo fit-space --logdir runs --run baseline --out space.npz --dim 30 --seed 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("--logdir", required=True, help="TensorBoard logdir")
    fit.add_argument("--run", default=None, help="base run (default: the only run with observations)")
    fit.add_argument("--step", type=int, default=None, help="base step (default: the last logged step)")
    fit.add_argument("--layers", default=None, help="comma-separated layers (default: all logged layers)")
    fit.add_argument("--out", required=True, help="space file to write (e.g. space.npz)")
    fit.add_argument("--dim", type=int, default=None, help="embedding dimension (default: ConceptEvoSpace's, 30)")
    fit.add_argument("--epochs", type=int, default=None, help="skip-gram epochs (default: ConceptEvoSpace's, 20)")
    fit.add_argument("--repetitions", type=int, default=None, help="co-activation pair repetitions (default: ConceptEvoSpace's, 2)")
    fit.add_argument("--k", type=int, default=None, help="stimuli per neuron (default: ConceptEvoSpace's, 10)")
    fit.add_argument("--sample-fraction", type=float, default=None)
    fit.add_argument("--groups", type=int, default=None, help="number of k-means concept groups")
    fit.add_argument("--indirect-from-other-steps", action="store_true",
                     help="use the run's other logged steps as evidence for indirect image embeddings")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--fast", action="store_true", help="read the logdir with rustboard")
    fit.add_argument("--no-progress", action="store_true")
    fit.set_defaults(func=run_fit_space)

    project = subparsers.add_parser(
        "project", help="back-fill embeddings and layouts of a saved space into every logged run and step",
        description="Place every logged observation in a saved space and write the embeddings, layouts "
                    "and metrics as new tags (only steps and layers not written yet). A space whose "
                    "content differs from the one logged under its name is refused; name it with --name."
                    "\n\nexample:\n\n    tb-conceptevo project --logdir runs --space space.npz\n"
                    "    tb-conceptevo project --logdir runs --space refit.npz --name conceptevo_refit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    project.add_argument("--logdir", required=True, help="TensorBoard logdir")
    project.add_argument("--space", required=True, help="space file written by fit-space")
    project.add_argument("--name", default=None,
                         help="name to log the space under (default: its kind, e.g. 'conceptevo'); "
                              "needed when another space is already logged under that name")
    project.add_argument("--runs", default=None, help="comma-separated runs (default: every run with observations)")
    project.add_argument("--layers", default=None, help="comma-separated layers (default: all logged layers)")
    project.add_argument("--fast", action="store_true", help="read the logdir with rustboard")
    project.add_argument("--no-progress", action="store_true")
    project.set_defaults(func=run_project)


# ------------------------------------------------------------------------ fit-space
def run_fit_space(args) -> int:
    from ..reading import ConceptReader
    from ..spaces.conceptevo import ConceptEvoSpace

    progress = not args.no_progress
    with ConceptReader(args.logdir, fast=args.fast) as logs:
        run = _base_run(logs, args.run, args.logdir)
        layers = _comma_list(args.layers) or logs.layers(run)
        steps = logs.steps(run, layers[0])
        step = steps[-1] if args.step is None else args.step
        if step not in steps:
            raise ValueError(f"run {run!r} has no observations at step {step}; logged steps: {_short(steps)}")
        base = logs.observation(run, step, layers)
        extra = []
        if args.indirect_from_other_steps:
            extra = [logs.observation(run, s, layers) for s in steps if s != step]
    # Hyper-parameters not given on the command line keep ConceptEvoSpace's defaults.
    given = {name: getattr(args, name) for name in ("dim", "epochs", "repetitions", "k")
             if getattr(args, name) is not None}
    space = ConceptEvoSpace(sample_fraction=args.sample_fraction, n_groups=args.groups, random_state=args.seed,
                            progress=progress, **given)
    print(f"fitting on run {run!r}, step {step}: {len(base)} layers, {base.n_neurons} neurons")
    space.fit(base, indirect_observations=extra)
    space.save(args.out)
    print(
        f"wrote {args.out}: {space.n_pairs_:,} co-activated pairs, {space.n_covered_images_:,} covered and "
        f"{space.n_indirect_images_:,} indirect images, reconstruction error {space.reconstruction_error_:.3f}"
    )
    return 0


# -------------------------------------------------------------------------- project
def run_project(args) -> int:
    from ..format import metadata
    from ..spaces import load_space

    space = load_space(args.space)
    if args.name:
        space.name = metadata.check_name(args.name, "--name")
    written, n_runs = project_logdir(args.logdir, space, runs=_comma_list(args.runs),
                                     layers=_comma_list(args.layers), fast=args.fast,
                                     progress=not args.no_progress, source=args.space)
    if written:
        print(f"back-filled {written} step(s) of {n_runs} run(s) into space {space.name!r} from {args.space}")
    else:
        print(f"nothing to do: every logged step is already placed in space {space.name!r}, and "
              f"{args.space} is that space (it places the first logged step of each run as logged)")
    return 0


def project_logdir(logdir: str, space, runs: Optional[List[str]] = None, layers: Optional[List[str]] = None,
                   fast: bool = False, progress: bool = True, source: str = "the space"):
    """Back-fill ``space``'s embeddings, layouts and metrics into every run and step of
    ``logdir`` that lacks them (new tags, ascending steps; a second call writes nothing).

    Refuses (ValueError, before writing anything) a space that places an already
    logged step of a run differently from the space logged under ``space.name``.
    Returns ``(steps written, runs touched)``.
    """
    from tqdm.auto import tqdm

    from ..reading import ConceptReader

    written = 0
    with ConceptReader(logdir, fast=fast) as logs:
        chosen = _runs(logs, ",".join(runs) if runs else None, logdir)
        differing = [(run, found) for run in chosen
                     for found in [_differs_from_logged(logs, run, space, layers)] if found]
        if differing:
            where = "; ".join(f"run {run!r}, layer {layer!r}, step {step}" for run, (layer, step) in differing[:5])
            taken = set(_logged_space_names(logs, chosen))
            suggestion = next(f"{space.name}_{i}" for i in range(2, 10_000) if f"{space.name}_{i}" not in taken)
            raise ValueError(
                f"{source} is not the space already logged as {space.name!r}: it places logged steps elsewhere "
                f"({where}), e.g. a refit with another seed or dim. Nothing was written. Log it next to the "
                f"first under its own name: --name {suggestion}"
            )
        plans = {run: _missing(logs, run, space.name, layers) for run in chosen}
        total = sum(len(plan) for plan in plans.values())
        bar = tqdm(total=total, desc="projecting", unit="step", disable=not progress)
        for run, plan in plans.items():
            if plan:
                written += _project_run(logs, logdir, run, space, plan, bar)
        bar.close()
    return written, sum(bool(p) for p in plans.values())


def _logged_space_names(logs, runs: List[str]) -> List[str]:
    """Names of the spaces logged in ``runs``."""
    from ..format import metadata

    names = set()
    for run in runs:
        for tag in logs.series(run).get(run, {}):
            parsed = metadata.parse_tag(tag)
            if parsed and parsed[0] == metadata.SPACE:
                names.add(parsed[1][0])
    return sorted(names)


def _differs_from_logged(logs, run: str, space, layers: Optional[List[str]]):
    """``(layer, step)`` where ``space`` places a logged observation differently from the
    embedding logged under ``space.name`` (the first such step of the first such layer
    is checked), or None when nothing is logged under that name or they agree.

    Logged vectors are float16, so agreement is judged to float16 precision."""
    import numpy as np

    for layer in layers or logs.layers(run):
        done = logs.space_steps(run, space.name, layer)
        if not done:
            continue
        step = done[0]
        logged = logs.embedding(run, space.name, layer, step)
        fresh = space.embed(logs.observation(run, step, [layer])[layer])
        fresh_vectors = np.asarray(fresh.vectors, np.float32).astype(np.float16).astype(np.float32)
        # float16 keeps 11 bits (relative error <= 4.9e-4); a refit differs by O(1)
        scale = float(np.abs(logged.vectors[logged.placed]).max()) if logged.placed.any() else 1.0
        same = (np.array_equal(np.asarray(fresh.placed, bool), logged.placed)
                and fresh_vectors.shape == logged.vectors.shape
                and np.allclose(fresh_vectors[logged.placed], logged.vectors[logged.placed],
                                rtol=4e-3, atol=4e-3 * scale))
        return None if same else (layer, step)
    return None


def _missing(logs, run: str, space_name: str, layers: Optional[List[str]]) -> Dict[int, List[str]]:
    """``{step: [layers without an embedding at that step]}``, ascending steps."""
    layers = layers or logs.layers(run)
    plan: Dict[int, List[str]] = {}
    for layer in layers:
        done = set(logs.space_steps(run, space_name, layer))
        for step in logs.steps(run, layer):
            if step not in done:
                plan.setdefault(step, []).append(layer)
    return dict(sorted(plan.items()))


def _project_run(logs, logdir: str, run: str, space, plan: Dict[int, List[str]], bar) -> int:
    import os

    from ..writer import ConceptWriter

    writer = ConceptWriter(os.path.join(logdir, run), probe=None, progress=False)
    try:
        _seed_previous(logs, run, space, writer, min(plan))
        for step, layers in plan.items():
            observation = logs.observation(run, step, layers)
            embeddings = {layer: space.embed(observation[layer]) for layer in layers}
            if len(layers) == len(logs.layers(run)):
                writer.add_space_embeddings(space, embeddings, step, observation.probe_hash)
            else:  # some layers were already there: per-layer metrics only
                for layer, embedding in embeddings.items():
                    writer.add_space_embedding(space, layer, embedding, step, observation.probe_hash)
            writer.flush()
            bar.update(1)
    finally:
        writer.close()
    return len(plan)


def _seed_previous(logs, run: str, space, writer, first_step: int) -> None:
    """Give the writer the embeddings logged just before ``first_step`` so the
    evolution speed of the first back-filled step is measured against them."""
    from types import SimpleNamespace

    from ..metrics.snapshot import whole_model

    previous = {}
    for layer in logs.layers(run):
        earlier = [s for s in logs.space_steps(run, space.name, layer) if s < first_step]
        if earlier:
            previous[layer] = (earlier[-1], logs.embedding(run, space.name, layer, earlier[-1]))
            writer.set_previous_embedding(space.name, layer, previous[layer][1])
    # The whole-model series too, when every layer was placed at the same earlier step.
    if previous and len(previous) == len(logs.layers(run)) and len({s for s, _ in previous.values()}) == 1:
        vectors, _, placed = whole_model([e for _, e in previous.values()])
        writer.set_previous_embedding(space.name, None, SimpleNamespace(vectors=vectors, placed=placed))


# -------------------------------------------------------------------------- helpers
def _runs(logs, requested: Optional[str], logdir: str) -> List[str]:
    available = [run for run in logs.runs() if logs.layers(run)]
    if not available:
        raise ValueError(
            f"no tb_conceptevo observations in {logdir!r}; record some first "
            "(ConceptWriter.add_concepts or 'tb-conceptevo record')"
        )
    if requested is None:
        return available
    runs = _comma_list(requested)
    unknown = [run for run in runs if run not in available]
    if unknown:
        raise ValueError(f"runs {unknown} have no observations in {logdir!r}; available: {available}")
    return runs


def _base_run(logs, requested: Optional[str], logdir: str) -> str:
    available = _runs(logs, None, logdir)
    if requested is not None:
        if requested not in available:
            raise ValueError(f"run {requested!r} has no observations in {logdir!r}; available: {available}")
        return requested
    if len(available) > 1:
        raise ValueError(f"{logdir!r} has several runs ({available}); choose the base with --run")
    return available[0]


def _comma_list(text: Optional[str]) -> Optional[List[str]]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (run or layer names from the command line); None when empty."""
    if not text:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _short(steps) -> str:
    steps = list(steps)
    return str(steps) if len(steps) <= 8 else f"[{steps[0]}, {steps[1]}, ..., {steps[-1]}] ({len(steps)} steps)"
