"""The project's own error type: every problem a user can fix is raised as one of these."""


class DashboardError(ValueError):
    """A problem with the user's input or files, with a message a person can act on.

    `field` names the parameter at fault (when there is one) so the UI can show the message next to it.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    @property
    def message(self) -> str:
        return str(self.args[0])
