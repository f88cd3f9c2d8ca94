"""Write a config that is an mmdet/mmseg config with its backbone replaced by ResT/ResTV2."""
from rest_mm.cli.swap_backbone import main

if __name__ == '__main__':
    main()
