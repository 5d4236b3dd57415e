"""The HTTP face (FastAPI): app and lifespan, routes, dependencies, tenants, the job
page, problem handlers, OpenAPI shaping. Imports everything below; nothing imports it
but the CLI."""

from .app import create_app

__all__ = ["create_app"]
