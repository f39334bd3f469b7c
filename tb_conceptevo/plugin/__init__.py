"""The ``conceptevo`` TensorBoard plugin (backend).

* :mod:`.loader` - the ``tensorboard_plugins`` entry point (kept free of heavy imports).
* :mod:`.plugin` - routes (``docs/http_api.md``), thin handlers over :mod:`.views`.
* :mod:`.views` - pure functions turning logged payloads into JSON / binary answers.
* :mod:`.store` - reads through TensorBoard's ``DataProvider`` with a bounded cache.
* :mod:`.web` - parameter validation, JSON errors, ETags.

Nothing here imports torch; numpy is imported only when TensorBoard loads the plugin.
"""
