"""Exceptions: every failure mote-local reports names the problem and, where there is one, the fix."""


class MoteError(Exception):
    """Base class of mote-local's errors."""


class ModelFileError(MoteError, ValueError):
    """The model file is missing, unreadable, not a GGUF, or not usable for this operation."""


class NotMoeError(ModelFileError):
    """The model has no Mixture-of-Experts layers."""


class SteeringError(MoteError, ValueError):
    """A steering entry or profile is invalid for the model."""


class ProfileError(SteeringError):
    """A profile is malformed, contradictory, or does not fit the model."""


class ProfileMismatchError(ProfileError):
    """The profile was made for a different model (its fingerprint differs)."""


class ChatTemplateError(MoteError, ValueError):
    """A chat template cannot be read or fails on a conversation (a syntax error, raise_exception, an unknown
    filter); the message names the template, why, and how to choose another (or --raw)."""


class InputError(MoteError, ValueError):
    """Input the engine cannot take: too long for the context, token ids out of range, empty."""


class CaptureError(MoteError, RuntimeError):
    """Routing capture was used wrongly (e.g. read outside a capture)."""


class EngineError(MoteError, RuntimeError):
    """The engine failed (decode error, missing native library)."""


class EvalError(MoteError, ValueError):
    """An evaluation cannot run as asked (no prompts, a profile without room for a random control, ...)."""


class DetectorError(MoteError, ValueError):
    """A behaviour detector is invalid (a bad regular expression, an empty phrase list, a judge without yes/no)."""
