"""fastvit_ssl: fast, faithful MoCo v3 pre-training of Vision Transformers."""

from pathlib import Path

# setup.py installs the top-level kernels/ folder as fastvit_ssl.kernels. In a source checkout that is not installed
# (PYTHONPATH=., e.g. on a bare GPU machine) the same name resolves through the checkout's root.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "setup.py").is_file() and (_checkout / "kernels" / "__init__.py").is_file():
    __path__.append(str(_checkout))
