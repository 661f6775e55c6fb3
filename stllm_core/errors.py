"""Typed errors raised at stllm_core's boundaries. Every message names what was wrong and the value seen."""


class STLLMError(Exception):
    """Base class of every error stllm_core raises on purpose."""


class ConfigError(STLLMError, ValueError):
    """A configuration field has an invalid value."""


class InputError(STLLMError, ValueError):
    """Data given to an API (frames, poses, points, question, message) is malformed."""


class ModelLoadError(STLLMError):
    """A model directory or one of its files is missing, corrupt or inconsistent."""


class DataError(STLLMError):
    """A clip folder, REA record or bag is missing something or is malformed."""
