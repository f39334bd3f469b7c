"""Plugin name, tag scheme and format version shared by the writer and the plugin.

Kept free of heavy imports (no torch, no numpy): the TensorBoard plugin loader
imports it at start-up.

Every tag written by this package starts with ``conceptevo/``.  The layout of every
payload is documented in ``docs/FORMAT.md``; change both together and bump
``FORMAT_VERSION`` when a reader of the old format could misread the new one.
"""

from .._names import check_name  # noqa: F401 - the parts of a tag are checked names

PLUGIN_NAME = "conceptevo"
FORMAT_VERSION = 1

#: Prefix of every tag of the plugin.
PREFIX = "conceptevo/"

# Tag kinds.  A tag is ``conceptevo/<kind>`` or ``conceptevo/<kind>/<qualifier>/.../<layer>``.
PROBE = "probe"              # once per run: probe header + thumbnail atlases
STIMULI = "stimuli"          # per layer, per step: top-k ids, activations, argmax positions
SPACE = "space"              # per space, per layer, per step: embedding + 2-D layout
DETECTOR = "detector"        # per detector, per layer, per step: top concepts + similarities
ANCHORS = "anchors"          # per space, once: anchor words + their layout
IMPORTANCE = "importance"    # per class, per layer, at step t': importance vectors
REVERT = "revert"            # per class, at step t': revert-evaluation table
IMAGE_LINKS = "image_links"  # per layer, per step: each probe image's most responsive channels

#: Scalar tags (ordinary TensorBoard scalars, shown in the Scalars dashboard too).
SCALAR_PREFIX = "concepts/"


def probe_tag() -> str:
    return PREFIX + PROBE


def stimuli_tag(layer: str) -> str:
    return f"{PREFIX}{STIMULI}/{layer}"


def image_links_tag(layer: str) -> str:
    return f"{PREFIX}{IMAGE_LINKS}/{layer}"


def space_tag(space: str, layer: str) -> str:
    return f"{PREFIX}{SPACE}/{space}/{layer}"


def detector_tag(detector: str, layer: str) -> str:
    return f"{PREFIX}{DETECTOR}/{detector}/{layer}"


def anchors_tag(space: str) -> str:
    return f"{PREFIX}{ANCHORS}/{space}"


def importance_tag(class_index: int, layer: str) -> str:
    return f"{PREFIX}{IMPORTANCE}/{int(class_index)}/{layer}"


def revert_tag(class_index: int) -> str:
    return f"{PREFIX}{REVERT}/{int(class_index)}"


def scalar_tag(metric: str, source: str, layer: str) -> str:
    """``concepts/<metric>/<space or detector>/<layer or 'all'>``."""
    return f"{SCALAR_PREFIX}{metric}/{source}/{layer}"


def parse_tag(tag: str):
    """Split a plugin tag into ``(kind, qualifiers, layer)``.

    Returns ``None`` for tags that are not ours.  Layer names may contain dots but
    never slashes (module names in PyTorch cannot contain ``/``); names given by
    spaces and detectors are validated by :func:`check_name`.

    >>> parse_tag("conceptevo/space/conceptevo/features.3")
    ('space', ('conceptevo',), 'features.3')
    >>> parse_tag("conceptevo/probe")
    ('probe', (), None)
    """
    if not tag.startswith(PREFIX):
        return None
    parts = tag[len(PREFIX):].split("/")
    kind = parts[0]
    if kind == PROBE and len(parts) == 1:
        return (PROBE, (), None)
    if kind in (STIMULI, IMAGE_LINKS) and len(parts) == 2:
        return (kind, (), parts[1])
    if kind in (SPACE, DETECTOR, IMPORTANCE) and len(parts) == 3:
        return (kind, (parts[1],), parts[2])
    if kind in (ANCHORS, REVERT) and len(parts) == 2:
        return (kind, (parts[1],), None)
    return None




def rustboard_unreadable(name: str) -> bool:
    """Whether TensorBoard's data server (rustboard, ``--load_fast``) cannot read a run
    of this name: it fails to parse blob keys holding quotes, backslashes or control
    characters (an upstream limitation)."""
    return any(c in name for c in '"\\') or any(ord(c) < 32 for c in name)


