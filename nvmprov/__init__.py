"""nvmprov: KVM/QEMU guests with virtual NVDIMMs, proven from inside."""

__version__ = "0.1.0"
