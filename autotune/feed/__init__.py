"""The training loop: DeviceLoader, MultiLoader, AdaptiveLoader, the stall monitor."""
