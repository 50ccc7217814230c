"""The merchant feed API: balances, history and a live cash-flow stream per merchant."""

from api.app import ApiService, build, create_app
from posflow.security.apiauth import Principal

__all__ = ["ApiService", "Principal", "build", "create_app"]
