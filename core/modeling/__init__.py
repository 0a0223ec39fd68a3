"""Model resolution, device/dtype choice and the on-disk checkpoint store."""
