"""Names that end up inside TensorBoard tags (spaces, detectors, layers): one check,
at the bottom floor, so every stage validates a name where the user gives it."""

_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def check_name(name: str, what: str = "name") -> str:
    """Validate a space/detector/layer name used inside a tag (no ``/``, not empty)."""
    if not isinstance(name, str) or not name or not set(name) <= _NAME_OK or len(name) > 200:
        raise ValueError(
            f"invalid {what} {name!r}: use 1-200 characters from letters, digits, '_', '-', '.'"
        )
    return name
