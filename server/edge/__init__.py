"""The HTTP edge: what every request meets before any route does its work (API keys and scopes, request
limits, the headers every answer carries, errors in OpenAI's shape with their statuses), uploads, the API
docs and the console (``/ui``)."""
