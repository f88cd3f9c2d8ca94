"""Train a detector or segmentor from an mmdet or mmseg config."""
from rest_mm.cli.train import main

if __name__ == '__main__':
    main()
