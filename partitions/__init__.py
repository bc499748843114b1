"""A/B slots on a disk and the boot-control backends that choose the next boot."""
