"""Typed errors for the command grammar.

Every way a command can be wrong raises a subclass of `CommandError`, so callers
(the guest CLI, the host channel reader, the controller's HTTP API) can catch one
type and still tell the user exactly where and why.  `CommandError` derives from
`ValueError` because a bad command is a bad value, and existing `except ValueError`
code keeps working.
"""

from __future__ import annotations


class CommandError(ValueError):
    """A command (text or dict) that cannot be accepted.

    `column` is the 1-based column in the text handed to the parser (None when the
    command came as a dict); `field` names the dict key or command field the error
    is about, so an error found after parsing can still be pointed at its token.
    """

    def __init__(
        self,
        detail: str,
        *,
        column: int | None = None,
        token: str | None = None,
        field: str | None = None,
    ) -> None:
        self.detail = detail
        self.column = column
        self.token = token
        self.field = field
        super().__init__(self.message)

    @property
    def message(self) -> str:
        location = f"column {self.column}" if self.column is not None else self.field
        return f"{location}: {self.detail}" if location else self.detail

    def located(self, *, column: int | None = None, field: str | None = None) -> CommandError:
        """The same error with a location added: value checks run without knowing
        where their text came from; their caller knows and fills it in."""
        return type(self)(
            self.detail,
            column=self.column if column is None else column,
            token=self.token,
            field=self.field if field is None else field,
        )


class EncodingError(CommandError):
    """The text is not UTF-8 or holds a character outside printable ASCII."""


class FramingError(CommandError):
    """The `@cmd@` framing is broken, or the text is too long."""


class UnknownCommandError(CommandError):
    """The command letter (or the service after R) is not one we know."""


class MissingTokenError(CommandError):
    """The command ends (or a dict lacks a key) where something is still required."""


class UnexpectedTokenError(CommandError):
    """A token (or dict key) appears where none is allowed."""


class InvalidValueError(CommandError):
    """A token is in the right place but its value is wrong."""


class MaskMismatchError(CommandError):
    """A filter mask disagrees with the field letters actually given."""


class DuplicateFieldError(CommandError):
    """A field letter is given more than once."""
