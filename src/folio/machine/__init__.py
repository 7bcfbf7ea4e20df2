"""The computer a run is on: device, dtype and thread choices, and torchrun processes."""
