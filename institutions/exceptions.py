"""Errors of the institutions app, each with a stable code."""

from clearinghouse.errors import HubError


class InstitutionExists(HubError):
    status, code, title = 409, "institution-exists", "Institution already registered"


class InvalidInstitution(HubError):
    status, code, title = 400, "invalid-institution", "Invalid institution"


class InvalidCredential(HubError):
    status, code, title = 400, "invalid-credential", "Invalid credential"
