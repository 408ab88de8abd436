"""Every example workflow, for `natflow worker examples.workflows`."""

from examples.greeting import greet
from examples.order import order

WORKFLOWS = [greet, order]

__all__ = ["WORKFLOWS", "greet", "order"]
