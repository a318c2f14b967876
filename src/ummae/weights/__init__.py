"""Weights: checkpoint files (read with weights_only, written atomically), loading them into
models (LoadReport), the reference importer and exports."""
