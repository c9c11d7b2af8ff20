"""The error of the application end (inference, export), in a module of its own so that the
modules on both sides of it (``inference`` reads exports, ``export`` reads checkpoints through
``inference``, both use ``hf_weights``) can raise it without importing each other."""

from __future__ import annotations


class InferenceError(ValueError):
    """A checkpoint, exported model, tokenizer or prompt that cannot be used; names it and the fix."""
