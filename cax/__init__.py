"""cax, "Copying All XENON": the per-site data-management daemon of a multi-site experiment."""

__version__ = "6.0.0.dev0"
