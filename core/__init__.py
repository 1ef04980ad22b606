"""The pure values the data path and the control plane share: slots, the cluster view, node
records, addresses, and the logging set-up. Imports nothing of the project above it."""
__version__ = "0.1.0"
