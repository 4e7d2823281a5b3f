"""The API's JSON parser. Its own module: DRF's views import the parser classes named in the settings while they are
imported themselves, so the parser must not live beside code that imports rest_framework.views (fleet/api.py)."""

from rest_framework import exceptions
from rest_framework.parsers import JSONParser


class JSONObjectParser(JSONParser):
    """Every API body is an object: anything else (``0.0``, ``[]``, ``"text"``, ``null``) is a 400 that says so,
    instead of being read as an empty body (which made ``0.0`` re-issue a device's secret with a generated one)."""

    def parse(self, stream, media_type=None, parser_context=None):
        data = super().parse(stream, media_type, parser_context)
        if not isinstance(data, dict):
            raise exceptions.ParseError(f"The JSON body must be an object ({{...}}), not {type(data).__name__}.")
        return data
