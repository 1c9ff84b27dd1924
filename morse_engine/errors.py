"""Errors the engine raises for bad input.

Every message names the input that is wrong and says how to fix it, so the ComfyUI
nodes and the command-line tools can show it to the user unchanged.
"""


class MorseError(ValueError):
    """Base class: bad input to the Morse engine."""


class ScheduleError(MorseError):
    """A Dash/Dot schedule or an LSD budget that cannot be used."""


class DotFileError(MorseError):
    """A Dot adapter file that cannot be read: missing, truncated, foreign or not safetensors."""


class DotMismatchError(MorseError):
    """A readable Dot adapter that was made for another Dash model."""


class DotInputError(MorseError):
    """A tensor handed to the Dot that it cannot process (channels, rank)."""
