"""Run a detector or segmentor on images and draw what it predicts."""
from rest_mm.cli.demo import main

if __name__ == '__main__':
    main()
