"""The public API resolves, and TensorBoard's entry point stays light."""

import subprocess
import sys

import tb_conceptevo


def test_every_public_name_resolves():
    for name in tb_conceptevo.__all__:
        assert getattr(tb_conceptevo, name) is not None, name


def test_plugin_entry_point_does_not_import_torch():
    code = "import sys, tb_conceptevo.plugin.loader; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
