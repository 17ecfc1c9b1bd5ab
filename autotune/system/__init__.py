"""The only code that reads the machine: CPUs, memory, /dev/shm, GPUs, torchrun."""
