"""Count the parameters and FLOPs of the backbones and the configs' models."""
from rest_mm.cli.get_flops import main

if __name__ == '__main__':
    main()
