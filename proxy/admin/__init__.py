"""The proxy's own endpoints (`/health`, `/usage`): a small werkzeug-routed WSGI app that
the root application mounts beside the proxy app."""

from .app import ADMIN_PATHS, AdminApp, AdminDeps

__all__ = ["ADMIN_PATHS", "AdminApp", "AdminDeps"]
