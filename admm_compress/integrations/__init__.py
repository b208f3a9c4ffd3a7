"""Adapters that run a compressor inside other training frameworks.

:mod:`admm_compress.integrations.lightning`: a ``lightning.Callback`` (needs the ``[lightning]`` extra).
"""
