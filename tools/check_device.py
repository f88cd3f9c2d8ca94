"""Check forward, backward and one training step on a device (CUDA or CPU) against float64."""
from rest_mm.cli.check_device import main

if __name__ == '__main__':
    main()
