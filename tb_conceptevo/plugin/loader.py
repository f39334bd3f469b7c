"""Entry point TensorBoard finds through ``tensorboard_plugins``.

TensorBoard imports this module at start-up and an import error here would stop it,
so it imports nothing heavy: the plugin itself (numpy, payload decoding) is imported
in :meth:`ConceptEvoLoader.load`.
"""

from tensorboard.plugins import base_plugin

from ..format import metadata


class ConceptEvoLoader(base_plugin.TBLoader):
    """Loads :class:`~tb_conceptevo.plugin.plugin.ConceptEvoPlugin`.

    ``fix_flags`` keeps every logged step of the plugin's data: by default TensorBoard
    keeps only 10 samples per tag of a third-party plugin, which would drop snapshots.
    An explicit ``--samples_per_plugin conceptevo=N`` from the user is respected.

    >>> import argparse
    >>> flags = argparse.Namespace(samples_per_plugin={})
    >>> ConceptEvoLoader().fix_flags(flags)
    >>> flags.samples_per_plugin
    {'conceptevo': 0}
    """

    def fix_flags(self, flags):
        samples = getattr(flags, "samples_per_plugin", None)
        if samples is None:
            samples = {}
        elif not isinstance(samples, dict):
            # Defensive: a caller that built flags by hand with the raw string form.
            from tensorboard.plugins.core.core_plugin import _parse_samples_per_plugin

            samples = _parse_samples_per_plugin(str(samples))
        # 0 = keep all (the Python loader) / "all" (rustboard; server_ingester maps 0 to it).
        samples.setdefault(metadata.PLUGIN_NAME, 0)
        flags.samples_per_plugin = samples

    def load(self, context):
        from .plugin import ConceptEvoPlugin

        return ConceptEvoPlugin(context)
