"""updater: a self-updating A/B host OS agent."""

__version__ = "0.1.0"
