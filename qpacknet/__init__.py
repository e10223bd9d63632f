"""qpacknet: Ada-QPacknet continual learning on a packed multi-task store."""

__version__ = "0.1.0"
