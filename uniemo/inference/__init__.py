"""Using a trained run: load it (or an export) for inference, generate, classify, transfer, export.

Apart from :mod:`uniemo.training` on purpose: the training stack never imports this package; evaluation, the
feedback pool and the report do. Import-light: submodules load torch only when imported themselves.
"""
