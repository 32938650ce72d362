"""The methods. Each module registers itself (its config section, its class) when imported, and importing this
package imports them all: a new method is a module here and its line below."""

from fastvit_ssl.methods import beit, mocov3, sit  # noqa: F401
