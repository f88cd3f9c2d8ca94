"""Draw a backbone's feature energy, positional gates and attention per stage."""
from rest_mm.cli.visualize import main

if __name__ == '__main__':
    main()
