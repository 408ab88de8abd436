"""Every example workflow, for `natflow worker examples.workflows`."""

from examples.flow import reindex, sync_account
from examples.greeting import greet
from examples.order import order

WORKFLOWS = [greet, order, sync_account, reindex]

__all__ = ["WORKFLOWS", "greet", "order", "reindex", "sync_account"]
