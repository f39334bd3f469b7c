"""The event format, torch-free and without computation, in the rooms TensorBoard's own
plugins use: ``metadata`` (plugin name, tag scheme, format version), ``summary`` (the
blob-sequence container: JSON header + raw arrays, its per-kind checks) and
``payloads`` (each kind's encoder beside its decoder).  ``docs/FORMAT.md`` documents
the bytes."""
