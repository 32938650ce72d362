"""The methods. Each module registers itself (its config section, its class) when imported, and importing this
package imports every module in it: a new method is one more file here."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
