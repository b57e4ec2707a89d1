"""Errors of the wallets app, each with a stable code."""

from clearinghouse.errors import HubError


class UsernameTaken(HubError):
    status, code, title = 409, "username-taken", "Username taken"


class InvalidPassword(HubError):
    status, code, title = 400, "invalid-password", "Password not accepted"


class InvalidCredentials(HubError):
    status, code, title = 401, "invalid-credentials", "Invalid username or password"


class NotAPerson(HubError):
    status, code, title = 403, "not-a-person", "Not a person"


class TooManyLinkCodes(HubError):
    status, code, title = 429, "too-many-link-codes", "Too many live link codes"


class LinkNotFound(HubError):
    status, code, title = 404, "link-not-found", "No such link"
