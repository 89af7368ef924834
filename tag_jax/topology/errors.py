"""The one error type of the topology package."""


class TopologyError(ValueError):
    """A topology is malformed or was asked about something it does not contain.

    Messages say what was found, where (field path, device id) and what to do.
    A ValueError subclass so callers that already catch ValueError keep working.
    """
