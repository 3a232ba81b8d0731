"""Settings dataclasses that round-trip through JSON (:class:`JsonSettings`).

The generators' settings (:class:`~basalseg.data.synth.SynthConfig`,
:class:`~basalseg.data.head.HeadConfig`) are frozen dataclasses recorded in a data set's
manifest: tuples are written as JSON lists and read back as tuples; unknown keys are refused.
"""

from __future__ import annotations

from dataclasses import asdict, fields

__all__ = ["JsonSettings"]


class JsonSettings:
    """Mixin for a dataclass: ``to_dict`` / ``from_dict`` through JSON-friendly values.

    ``_SETTINGS_NAME`` names the settings in the error of :meth:`from_dict`.
    """

    _SETTINGS_NAME = "config"

    def to_dict(self) -> dict:
        """The fields as a dict, tuples as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        """The settings of :meth:`to_dict`'s dict (lists back to tuples).

        Raises:
            ValueError: a key that is not a field (naming it).
        """
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{cls._SETTINGS_NAME}: unknown setting(s) {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
