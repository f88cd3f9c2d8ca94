"""Convert an authors' ResT/ResTv2 checkpoint to rest_mm's key names."""
from rest_mm.cli.convert_weights import main

if __name__ == '__main__':
    main()
