"""Make NVIDIA DALI unimportable in this Python process and its children (``PYTHONPATH=.ci/no_dali``).

CI runs the test suite once this way to prove that it passes where DALI has no wheel (macOS, ARM) or is
not staged yet (the GPU machine at start): ``import nvidia.dali`` and ``importlib.util.find_spec`` raise
ModuleNotFoundError, as they do when the package is absent. Children inherit ``PYTHONPATH``, so the
``fastmeal`` commands the tests start see the same.
"""

import sys
from importlib.abc import MetaPathFinder


class _BlockDali(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "nvidia.dali" or fullname.startswith("nvidia.dali."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by .ci/no_dali)", name=fullname)
        return None


sys.meta_path.insert(0, _BlockDali())
